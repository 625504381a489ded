//! Keys issued by another system and imported (Kong key-auth, Tyk custom keys, Unkey hash
//! exports…): any string of 16–256 visible ASCII characters. They are stored, like keygate's
//! own keys, only as SHA-256.
//!
//! A string that starts with keygate's configured prefix claims to be a keygate key: it must
//! pass the shape and checksum check, so the fast refusal of mistyped or forged keygate keys
//! (no cache, no store) is unchanged. Every other string of the foreign shape goes through the
//! cache, the negative cache and, on a miss, the store: one store lookup per distinct string
//! per negative TTL, bounded further by the failed-authentication limit per client address.
//! (The checksum was never a defence against an attacker, who can compute a CRC32; it spares
//! the store mistyped keys. Random strings of the foreign shape cost what well-formed unknown
//! keygate keys always cost.)

/// Shortest imported plaintext key.
pub const MIN_FOREIGN_KEY_LEN: usize = 16;
/// Longest imported plaintext key (and longest API key a credential may carry).
pub const MAX_FOREIGN_KEY_LEN: usize = 256;

/// True when `key` has the shape of an imported key: 16–256 visible ASCII characters
/// (`!`–`~`, no spaces or control characters). Pure, no allocation.
pub fn shape(key: &str) -> bool {
    (MIN_FOREIGN_KEY_LEN..=MAX_FOREIGN_KEY_LEN).contains(&key.len())
        && key.bytes().all(|b| b.is_ascii_graphic())
}

/// The part of an imported key shown and logged as its `prefix`: the first quarter of it, at
/// most 12 characters, so a short foreign key is never mostly revealed.
pub fn display_prefix(key: &str) -> String {
    let n = (key.len() / 4).min(crate::keys::DISPLAY_PREFIX_LEN);
    key[..n].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_is_16_to_256_visible_ascii_characters() {
        assert!(shape(&"a".repeat(16)));
        assert!(shape(&"~".repeat(256)));
        assert!(!shape(&"a".repeat(15)));
        assert!(!shape(&"a".repeat(257)));
        assert!(!shape("aaaaaaaa aaaaaaaa"));
        assert!(!shape("aaaaaaaa\taaaaaaaa"));
        assert!(!shape("aaaaaaaaaaaaaaaaé"));
    }

    #[test]
    fn the_display_prefix_is_at_most_a_quarter_of_the_key() {
        assert_eq!(display_prefix("0123456789abcdef"), "0123");
        assert_eq!(display_prefix(&"x".repeat(200)), "x".repeat(12));
    }
}
