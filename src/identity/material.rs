//! Signing keys as the process holds them: generated from the operating system's CSPRNG or read
//! from PKCS#8 DER (the store) or PEM (`signing_key_file`); exported only as public JWKs. The
//! key id is the RFC 7638 thumbprint of the public key, so every instance names a key alike.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use jsonwebtoken::{Algorithm, EncodingKey};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use rand::Rng;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// The signature algorithms of the assertion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
pub enum Alg {
    /// Ed25519 (RFC 8037).
    #[default]
    EdDSA,
    /// ECDSA P-256 with SHA-256.
    ES256,
}

impl Alg {
    pub fn name(self) -> &'static str {
        match self {
            Alg::EdDSA => "EdDSA",
            Alg::ES256 => "ES256",
        }
    }

    pub fn parse(s: &str) -> Option<Alg> {
        match s {
            "EdDSA" => Some(Alg::EdDSA),
            "ES256" => Some(Alg::ES256),
            _ => None,
        }
    }

    pub fn jwt(self) -> Algorithm {
        match self {
            Alg::EdDSA => Algorithm::EdDSA,
            Alg::ES256 => Algorithm::ES256,
        }
    }
}

/// A private signing key, ready to sign; `Debug` shows the key id only.
pub struct Material {
    pub alg: Alg,
    pub kid: String,
    /// PKCS#8 DER of the private key (written to the store only).
    pkcs8: zeroize::Zeroizing<Vec<u8>>,
    pub encoding: EncodingKey,
    /// The public JWK (with `kid`, `alg`, `use`).
    pub jwk: Value,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material")
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl Material {
    /// A new key from the CSPRNG.
    pub fn generate(alg: Alg) -> Material {
        let mut rng = rand::rng();
        loop {
            let mut seed = zeroize::Zeroizing::new([0u8; 32]);
            rng.fill(&mut seed[..]);
            let der = match alg {
                Alg::EdDSA => ed25519_dalek::SigningKey::from_bytes(&seed)
                    .to_pkcs8_der()
                    .ok(),
                // A scalar of zero or past the group order (odds of 2^-32) is drawn again.
                Alg::ES256 => p256::SecretKey::from_slice(&seed[..])
                    .ok()
                    .and_then(|k| k.to_pkcs8_der().ok()),
            };
            if let Some(der) = der
                && let Ok(m) = Material::from_pkcs8(alg, der.as_bytes())
            {
                return m;
            }
        }
    }

    /// A key of algorithm `alg` from its PKCS#8 DER.
    pub fn from_pkcs8(alg: Alg, der: &[u8]) -> Result<Material, String> {
        let (jwk, encoding) = match alg {
            Alg::EdDSA => {
                let k = ed25519_dalek::SigningKey::from_pkcs8_der(der)
                    .map_err(|_| "not an Ed25519 PKCS#8 private key".to_owned())?;
                let x = URL_SAFE_NO_PAD.encode(k.verifying_key().as_bytes());
                (
                    json!({"crv": "Ed25519", "kty": "OKP", "x": x}),
                    EncodingKey::from_ed_der(der),
                )
            }
            Alg::ES256 => {
                let k = p256::SecretKey::from_pkcs8_der(der)
                    .map_err(|_| "not a P-256 PKCS#8 private key".to_owned())?;
                let point = k.public_key().to_encoded_point(false);
                let (Some(x), Some(y)) = (point.x(), point.y()) else {
                    return Err("a P-256 key without coordinates".into());
                };
                (
                    json!({"crv": "P-256", "kty": "EC", "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y)}),
                    EncodingKey::from_ec_der(der),
                )
            }
        };
        let kid = thumbprint(&jwk);
        let mut jwk = jwk;
        if let Some(o) = jwk.as_object_mut() {
            o.insert("kid".into(), Value::String(kid.clone()));
            o.insert("alg".into(), Value::String(alg.name().into()));
            o.insert("use".into(), Value::String("sig".into()));
        }
        Ok(Material {
            alg,
            kid,
            pkcs8: zeroize::Zeroizing::new(der.to_vec()),
            encoding,
            jwk,
        })
    }

    /// A key from a PEM file's text: PKCS#8 (`PRIVATE KEY`, Ed25519 or P-256) or SEC1
    /// (`EC PRIVATE KEY`, P-256), as `openssl genpkey -algorithm ed25519` or
    /// `openssl ecparam -name prime256v1 -genkey` write them. The error never quotes the file.
    pub fn from_pem(text: &str) -> Result<Material, String> {
        if let Ok(k) = ed25519_dalek::SigningKey::from_pkcs8_pem(text) {
            let der = k.to_pkcs8_der().map_err(|_| "cannot encode the key")?;
            return Material::from_pkcs8(Alg::EdDSA, der.as_bytes());
        }
        let p256 = p256::SecretKey::from_pkcs8_pem(text)
            .ok()
            .or_else(|| p256::SecretKey::from_sec1_pem(text).ok());
        if let Some(k) = p256 {
            let der = k.to_pkcs8_der().map_err(|_| "cannot encode the key")?;
            return Material::from_pkcs8(Alg::ES256, der.as_bytes());
        }
        Err("not a PEM private key of Ed25519 (PKCS#8) or P-256 (PKCS#8 or SEC1)".into())
    }

    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }
}

/// RFC 7638: SHA-256 of the required members in lexicographic order, base64url.
fn thumbprint(jwk: &Value) -> String {
    // serde_json's map keeps keys sorted (no `preserve_order`), and the members are the
    // required ones only, so this is the canonical form.
    let canonical = serde_json::to_vec(jwk).expect("a JSON value serializes");
    URL_SAFE_NO_PAD.encode(Sha256::digest(&canonical))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thumbprint_matches_rfc_8037_appendix_a3() {
        // RFC 8037 A.3: the thumbprint of the example Ed25519 key.
        let jwk = json!({"crv": "Ed25519", "kty": "OKP", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"});
        assert_eq!(
            thumbprint(&jwk),
            "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
        );
    }

    #[test]
    fn generated_keys_round_trip_through_pkcs8_and_pem() {
        for alg in [Alg::EdDSA, Alg::ES256] {
            let a = Material::generate(alg);
            let b = Material::from_pkcs8(alg, a.pkcs8()).unwrap();
            assert_eq!(a.kid, b.kid);
            assert_eq!(a.jwk, b.jwk);
            assert_ne!(Material::generate(alg).kid, a.kid);
            let pem = match alg {
                Alg::EdDSA => ed25519_dalek::SigningKey::from_pkcs8_der(a.pkcs8())
                    .unwrap()
                    .to_pkcs8_pem(Default::default())
                    .unwrap(),
                Alg::ES256 => p256::SecretKey::from_pkcs8_der(a.pkcs8())
                    .unwrap()
                    .to_pkcs8_pem(Default::default())
                    .unwrap(),
            };
            let c = Material::from_pem(&pem).unwrap();
            assert_eq!((c.alg, c.kid.as_str()), (alg, a.kid.as_str()));
            // The public JWK holds no private member.
            assert!(a.jwk.get("d").is_none());
        }
        assert!(
            Material::from_pem("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
                .is_err()
        );
        assert!(Material::from_pkcs8(Alg::ES256, Material::generate(Alg::EdDSA).pkcs8()).is_err());
    }
}
