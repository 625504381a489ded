//! Signing keys of signed identity (`[identity]`), as the store keeps them: every instance on
//! one store signs with the same set. The private key is kept as PKCS#8 DER; it never leaves
//! the process except to the store, and its `Debug` prints `***`.

use crate::keys::Millis;

/// One signing key.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningKeyRecord {
    /// The key id (`kid`): the RFC 7638 thumbprint of the public key.
    pub kid: String,
    /// `EdDSA` or `ES256`.
    pub algorithm: String,
    /// The private key, PKCS#8 DER.
    pub private_pkcs8: Vec<u8>,
    /// When it starts signing (Unix ms). The key signing at a moment is the one with the
    /// latest `active_from` not after it.
    pub active_from: Millis,
    pub created_at: Millis,
}

impl std::fmt::Debug for SigningKeyRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKeyRecord")
            .field("kid", &self.kid)
            .field("algorithm", &self.algorithm)
            .field("private_pkcs8", &"***")
            .field("active_from", &self.active_from)
            .field("created_at", &self.created_at)
            .finish()
    }
}

/// How a key is added to the set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddKey {
    /// Only when the store holds no signing key yet (the first start of a fleet: every
    /// instance proposes one, the first write wins and all use it).
    IfNone,
    /// Always (a rotation).
    Always,
}
