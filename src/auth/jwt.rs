//! Access tokens minted from API keys (`POST /auth/login`): HS256, one pinned algorithm,
//! verified with a strict `jsonwebtoken::Validation` (required claims, issuer, audience when
//! configured), plus checks of our own: a bounded size before any decoding, `exp` and `nbf`
//! with a bounded leeway, `iat` not in the future, a lifetime no longer than the configured one.
//! Time is the caller's `now` (the authenticator's clock), never the library's own reading of
//! the system clock.
//!
//! A token names the key it was minted from (`kid`) and that key's token generation (`rot`);
//! the proxy refuses it once the key is revoked, disabled, deleted or rotated, for good.

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::keys::{Millis, Principal, Secret};

/// Longest token accepted; anything longer is refused before it is decoded.
pub const MAX_TOKEN_LEN: usize = 4 * 1024;
/// Shortest signing secret accepted (bytes).
pub const MIN_SECRET_LEN: usize = crate::config::MIN_JWT_SECRET_LEN;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    pub jti: String,
    /// Id of the API key the token was minted from.
    pub kid: String,
    /// The key's token generation (`tokens_valid_after`, ms; 0 = none) when the token was
    /// minted: moved on by every disable, rotation and revoke, so the token is refused after
    /// any of them, for good.
    pub rot: i64,
    /// Minted with a key's previous secret during a rotation's grace period: the end of that
    /// period (ms). The token is refused from then on, whatever its `exp` and the leeway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_until: Option<i64>,
    pub permissions: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct JwtSettings {
    pub secret: Secret,
    pub issuer: String,
    pub audience: Option<String>,
    pub ttl: Duration,
    pub leeway: Duration,
}

pub struct Jwt {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    header: Header,
    issuer: String,
    audience: Option<String>,
    ttl: Duration,
    leeway: Duration,
}

/// A minted token.
pub struct Token {
    pub access_token: Secret,
    pub expires_in: u64,
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidToken {
    /// Not one keygate signed (signature, algorithm, issuer, audience or a required claim).
    #[error("invalid token")]
    Forged,
    /// Signed by keygate, but outside its time bounds (expired, not yet valid, or longer-lived
    /// than `ttl_secs` allows now).
    #[error("invalid token")]
    OutOfTime,
}

/// Body of `POST /auth/login` (no `Debug`: it holds a key). Other fields are ignored.
#[derive(Deserialize, utoipa::ToSchema)]
#[schema(examples(json!({"api_key": "kg_3xQ9vLm2aR7tYp0sWk4eHd8uJc6nBf1gZ5"})))]
pub struct LoginRequest {
    /// An API key; one that does not authenticate answers 401 `invalid_api_key`.
    pub api_key: String,
}

/// Answer of `POST /auth/login`.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(examples(json!({"access_token": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhY21lIn0.c2lnbmF0dXJl", "token_type": "Bearer", "expires_in": 900})))]
pub struct TokenResponse {
    /// A JWT to send as `Authorization: Bearer <token>`.
    pub access_token: String,
    /// Always `Bearer`.
    #[schema(pattern = "^Bearer$")]
    pub token_type: String,
    /// Seconds until the token expires.
    pub expires_in: u64,
}

impl From<Token> for TokenResponse {
    fn from(t: Token) -> Self {
        Self {
            access_token: t.access_token.0,
            token_type: "Bearer".into(),
            expires_in: t.expires_in,
        }
    }
}

impl Jwt {
    pub fn new(s: &JwtSettings) -> Self {
        let secret = s.secret.expose().as_bytes();
        let mut validation = Validation::new(Algorithm::HS256);
        // `exp` and `nbf` are checked in `verify`, against the caller's clock.
        validation.leeway = s.leeway.as_secs();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.set_issuer(&[s.issuer.as_str()]);
        let mut required = vec!["exp", "iat", "nbf", "iss", "sub"];
        match &s.audience {
            Some(aud) => {
                validation.set_audience(&[aud.as_str()]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        let mut header = Header::new(Algorithm::HS256);
        header.typ = Some("JWT".into());
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            header,
            issuer: s.issuer.clone(),
            audience: s.audience.clone(),
            ttl: s.ttl,
            leeway: s.leeway,
        }
    }

    /// A random secret for a single process (tokens die with it).
    pub fn random_secret() -> Secret {
        use rand::Rng;
        let bytes: [u8; 32] = rand::rng().random();
        Secret(hex::encode(bytes))
    }

    /// Mints a token for `p`, expiring after the TTL or when the key stops being valid,
    /// whichever comes first.
    pub fn issue(&self, p: &Principal, generation: Option<Millis>, now: Millis) -> Token {
        let now_s = now / 1000;
        let mut exp = now_s + self.ttl.as_secs() as i64;
        if let Some(until) = p.valid_until() {
            exp = exp.min(until / 1000);
        }
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: p.client_id().to_owned(),
            aud: self.audience.clone(),
            iat: now_s,
            nbf: now_s,
            exp,
            jti: Uuid::now_v7().to_string(),
            kid: p.key_id.to_string(),
            rot: generation.unwrap_or(0),
            grace_until: p.grace_until(),
            permissions: p.permission_list(),
        };
        let token = jsonwebtoken::encode(&self.header, &claims, &self.encoding)
            .expect("HS256 signing cannot fail");
        Token {
            access_token: Secret(token),
            expires_in: (exp - now_s).max(0) as u64,
        }
    }

    /// Seconds past `exp` during which a token is still accepted.
    pub fn leeway_secs(&self) -> i64 {
        self.leeway.as_secs() as i64
    }

    /// Verifies signature, algorithm, claims and our own bounds.
    pub fn verify(&self, token: &str, now: Millis) -> Result<Claims, InvalidToken> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(InvalidToken::Forged);
        }
        let data =
            jsonwebtoken::decode::<Claims>(token.as_bytes(), &self.decoding, &self.validation)
                .map_err(|_| InvalidToken::Forged)?;
        let c = data.claims;
        let now_s = now / 1000;
        let leeway = self.leeway_secs();
        let expired = c.exp < now_s - leeway;
        let not_yet = c.nbf > now_s + leeway || c.iat > now_s + leeway;
        if expired || not_yet || c.exp - c.iat > self.ttl.as_secs() as i64 {
            return Err(InvalidToken::OutOfTime);
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use std::sync::Arc;

    use crate::clock::FakeClock;

    fn settings(secret: &str, aud: Option<&str>) -> JwtSettings {
        JwtSettings {
            secret: Secret(secret.into()),
            issuer: "keygate".into(),
            audience: aud.map(str::to_owned),
            ttl: Duration::from_secs(900),
            leeway: Duration::from_secs(30),
        }
    }

    fn principal() -> Arc<Principal> {
        let (record, new) = crate::keys::ApiKey::builder()
            .client("acme")
            .permissions(&["A"])
            .created_at(FakeClock::START)
            .record("pro");
        let limit = crate::keys::RateLimit {
            per_second: Some(1),
            per_minute: None,
            per_hour: None,
            burst: 1,
        };
        Principal::from_record(
            &record,
            &new.hash,
            Arc::new(crate::keys::bucket::KeyLimiter::new(
                limit,
                FakeClock::new().clock(),
            )),
        )
    }

    const SECRET: &str = "0123456789abcdef0123456789abcdef-test";

    fn sign_raw(header: &str, claims: &serde_json::Value, secret: &[u8]) -> String {
        use hmac::Mac;
        let h = B64.encode(header);
        let c = B64.encode(claims.to_string());
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
        mac.update(format!("{h}.{c}").as_bytes());
        format!("{h}.{c}.{}", B64.encode(mac.finalize().into_bytes()))
    }

    fn good_claims(now: i64) -> serde_json::Value {
        serde_json::json!({
            "iss": "keygate", "sub": "acme", "iat": now, "nbf": now, "exp": now + 600,
            "jti": "j", "kid": Uuid::now_v7().to_string(), "rot": 0, "permissions": []
        })
    }

    #[test]
    fn round_trip() {
        let jwt = Jwt::new(&settings(SECRET, Some("api")));
        let p = principal();
        let now = FakeClock::new().now_millis();
        let t = jwt.issue(&p, None, now);
        assert_eq!(t.expires_in, 900);
        let c = jwt.verify(t.access_token.expose(), now).unwrap();
        assert_eq!(c.sub, "acme");
        assert_eq!(c.kid, p.key_id.to_string());
        assert_eq!(c.aud.as_deref(), Some("api"));
        // Our hand-rolled signer agrees with the library (so the corpus below is meaningful).
        let raw = sign_raw(
            r#"{"alg":"HS256","typ":"JWT"}"#,
            &good_claims(now / 1000),
            SECRET.as_bytes(),
        );
        assert!(Jwt::new(&settings(SECRET, None)).verify(&raw, now).is_ok());
    }

    #[test]
    fn forged_and_malformed_tokens_are_refused() {
        let jwt = Jwt::new(&settings(SECRET, Some("api")));
        let now_ms = FakeClock::new().now_millis();
        let now = now_ms / 1000;
        let mut good = good_claims(now);
        good["aud"] = "api".into();
        let hs = r#"{"alg":"HS256","typ":"JWT"}"#;
        let valid = sign_raw(hs, &good, SECRET.as_bytes());
        assert!(jwt.verify(&valid, now_ms).is_ok());

        let with = |k: &str, v: serde_json::Value| {
            let mut c = good.clone();
            c[k] = v;
            sign_raw(hs, &c, SECRET.as_bytes())
        };
        let without = |k: &str| {
            let mut c = good.clone();
            c.as_object_mut().unwrap().remove(k);
            sign_raw(hs, &c, SECRET.as_bytes())
        };
        let (h, c, _) = {
            let mut it = valid.split('.');
            (it.next().unwrap(), it.next().unwrap(), it.next().unwrap())
        };
        let mut corpus: Vec<(String, String)> = vec![
            (
                "alg none".into(),
                format!("{}.{c}.", B64.encode(r#"{"alg":"none","typ":"JWT"}"#)),
            ),
            (
                "alg None".into(),
                format!("{}.{c}.", B64.encode(r#"{"alg":"None"}"#)),
            ),
            (
                "alg NONE junk sig".into(),
                format!("{}.{c}.AAAA", B64.encode(r#"{"alg":"NONE"}"#)),
            ),
            (
                "wrong secret".into(),
                sign_raw(hs, &good, b"another-secret-another-secret-xx"),
            ),
            (
                "RS256 header, HMAC body".into(),
                sign_raw(r#"{"alg":"RS256"}"#, &good, SECRET.as_bytes()),
            ),
            (
                "ES256 header".into(),
                sign_raw(r#"{"alg":"ES256"}"#, &good, SECRET.as_bytes()),
            ),
            (
                "HS512".into(),
                sign_raw(r#"{"alg":"HS512"}"#, &good, SECRET.as_bytes()),
            ),
            ("expired".into(), with("exp", (now - 120).into())),
            ("not yet valid".into(), with("nbf", (now + 120).into())),
            (
                "issued in the future".into(),
                with("iat", (now + 120).into()),
            ),
            (
                "lifetime too long".into(),
                with("exp", (now + 100_000).into()),
            ),
            ("wrong issuer".into(), with("iss", "evil".into())),
            ("wrong audience".into(), with("aud", "other".into())),
            ("exp as string".into(), with("exp", "tomorrow".into())),
            ("missing exp".into(), without("exp")),
            ("missing iat".into(), without("iat")),
            ("missing sub".into(), without("sub")),
            ("missing aud".into(), without("aud")),
            ("missing iss".into(), without("iss")),
            (
                "tampered payload".into(),
                format!(
                    "{h}.{}.{}",
                    with("sub", "root".into()).split('.').nth(1).unwrap(),
                    valid.split('.').nth(2).unwrap()
                ),
            ),
            ("truncated".into(), valid[..valid.len() - 5].to_string()),
            ("two parts".into(), format!("{h}.{c}")),
            ("four parts".into(), format!("{valid}.x")),
            ("64 KB".into(), format!("{h}.{}.sig", "A".repeat(64 * 1024))),
            ("garbage".into(), "a.b.c".into()),
        ];
        // Every single-bit flip of the signature.
        let sig = B64.decode(valid.split('.').nth(2).unwrap()).unwrap();
        for i in 0..sig.len() * 8 {
            let mut s = sig.clone();
            s[i / 8] ^= 1 << (i % 8);
            corpus.push((
                format!("sig bit {i}"),
                format!("{h}.{c}.{}", B64.encode(&s)),
            ));
        }
        assert!(corpus.len() >= 40);
        for (name, token) in &corpus {
            assert!(jwt.verify(token, now_ms).is_err(), "accepted: {name}");
        }
    }

    /// `exp`, `nbf` and `iat` are judged at the `now` the caller passes (its clock), with the
    /// leeway, to the second.
    #[test]
    fn expiry_and_not_before_follow_the_callers_clock() {
        let jwt = Jwt::new(&settings(SECRET, None));
        let clock = FakeClock::new();
        let issued = clock.now_millis();
        let t = jwt.issue(&principal(), None, issued);
        let token = t.access_token.expose();
        assert!(jwt.verify(token, clock.now_millis()).is_ok());
        // Valid until `exp` plus the leeway, refused a second later.
        clock.advance(Duration::from_secs(900 + 30));
        assert!(
            jwt.verify(token, clock.now_millis()).is_ok(),
            "refused within the leeway"
        );
        clock.advance(Duration::from_secs(1));
        assert_eq!(
            jwt.verify(token, clock.now_millis()),
            Err(InvalidToken::OutOfTime),
            "expired"
        );
        // Seen by a clock behind the issuer's: accepted within the leeway, refused before it.
        assert!(jwt.verify(token, issued - 30_000).is_ok());
        assert_eq!(
            jwt.verify(token, issued - 31_000),
            Err(InvalidToken::OutOfTime),
            "not yet valid"
        );
    }
}
