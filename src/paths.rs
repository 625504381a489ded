//! Path checks, before any route is matched. A path is refused (400) when an upstream could
//! read it as a different path than the one matched: dot-segments, empty segments (`//`),
//! backslashes, `;` parameters, segments ending in `.` or a space, encoded `.`, `/`, `\`, `;`,
//! `%` (so nothing is double-encoded), control characters (C0 and C1, raw or encoded),
//! malformed escapes, escapes that are not UTF-8 (overlong `%c0%ae`), and characters whose
//! compatibility form holds `.`, `/`, `\`, `;` or `%` (full-width `．`, `／`…). What passes is
//! forwarded byte for byte, so the path that was authorised is the path the upstream sees.
//!
//! Pure functions over bytes; used by the route table and by config validation.

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// True for bytes that must never appear percent-encoded in a path we forward.
fn forbidden_encoded(b: u8) -> bool {
    matches!(b, b'.' | b'/' | b'\\' | b';' | b'%') || b < 0x20 || b == 0x7f
}

/// Code points whose NFKC form contains `.`, `/`, `\`, `;` or `%` (the whole list, from the
/// Unicode data): an upstream that normalises would read them as separators or dots.
fn lookalike(c: char) -> bool {
    matches!(
        c as u32,
        0x037E
            | 0x2024..=0x2026
            | 0x2100
            | 0x2101
            | 0x2105
            | 0x2106
            | 0x2488..=0x249B
            | 0x33C2
            | 0x33C7
            | 0x33D8
            | 0xFE14
            | 0xFE19
            | 0xFE30
            | 0xFE52
            | 0xFE54
            | 0xFE68
            | 0xFE6A
            | 0xFF05
            | 0xFF0E
            | 0xFF0F
            | 0xFF1B
            | 0xFF3C
            | 0x1F100
    )
}

/// The bytes of `b` with well-formed percent-escapes decoded.
pub fn decoded(b: &[u8]) -> impl Iterator<Item = u8> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        let c = *b.get(i)?;
        if c == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            )
        {
            i += 3;
            return Some(h << 4 | l);
        }
        i += 1;
        Some(c)
    })
}

/// Checks a request path. `Err` carries the reason for the 400 body. Unless `non_ascii` is
/// allowed, a path that is not ASCII once percent-decoded is refused too: an upstream that
/// folds Unicode (compatibility forms, case) could read `/ａdmin` or `/admın` as `/admin`.
pub fn check_path(path: &str, non_ascii_allowed: bool) -> Result<(), &'static str> {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return Err("the path must start with '/'");
    }
    let mut non_ascii = false;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b'\\' => return Err("backslashes are not allowed in paths"),
            b';' => return Err("';' parameters are not allowed in paths"),
            b'%' => {
                let (Some(h), Some(l)) = (
                    b.get(i + 1).copied().and_then(hex),
                    b.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err("malformed percent-encoding in path");
                };
                let decoded = h << 4 | l;
                if decoded == b'%' {
                    return Err("an encoded '%' (double encoding) is not allowed in paths");
                }
                if forbidden_encoded(decoded) {
                    return Err(
                        "encoded '.', '/', '\\', ';' or control characters are not allowed in paths",
                    );
                }
                // A decoding upstream would end the path there and read the rest as a query or
                // fragment, past the route that matched the whole.
                if decoded == b'?' || decoded == b'#' {
                    return Err("an encoded '?' or '#' is not allowed in paths");
                }
                non_ascii |= decoded >= 0x80;
                i += 3;
                continue;
            }
            c if c < 0x20 || c == 0x7f => {
                return Err("control characters are not allowed in paths");
            }
            c => non_ascii |= c >= 0x80,
        }
        i += 1;
    }
    // Segment rules (the leading '/' makes the first split element empty).
    let mut segments = path[1..].split('/').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        if seg.is_empty() && !last {
            return Err("empty path segments ('//') are not allowed");
        }
        if seg == "." || seg == ".." {
            return Err("dot-segments are not allowed in paths");
        }
        // Windows servers trim both from the end of a segment.
        if seg.ends_with(['.', ' ']) || seg.ends_with("%20") {
            return Err("path segments ending in '.' or a space are not allowed");
        }
    }
    if non_ascii && !non_ascii_allowed {
        return Err(
            "non-ASCII characters are not allowed in paths (set proxy.allow_non_ascii_paths to accept them)",
        );
    }
    if non_ascii {
        let bytes: Vec<u8> = decoded(b).collect();
        let text =
            std::str::from_utf8(&bytes).map_err(|_| "paths must be UTF-8 once percent-decoded")?;
        if text.chars().any(char::is_control) {
            return Err("control characters are not allowed in paths");
        }
        if text.chars().any(lookalike) {
            return Err(
                "characters that read as '.', '/', '\\', ';' or '%' are not allowed in paths",
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_ambiguous_paths() {
        for p in [
            "//admin",
            "/./admin",
            "/x/../admin",
            "/%2e%2e/admin",
            "/.%2E/admin",
            "/%2fadmin",
            "/admin%2F",
            "/\\admin",
            "/%5cadmin",
            "/%252e%252e/admin",
            "/%252fadmin",
            "/admin;x",
            "/admin.",
            "/admin%00",
            "/admin%0a",
            "/a/..",
            "/a/.",
            "/%zz",
            "/%2",
            "/%2561dmin",
            "/%25",
            "/admin%20",
            "/admin%20/x",
            "/admin ",
            "/x/%c0%ae%c0%ae/admin",
            "/v1%c0%afextract",
            "/x/%ef%bc%8e%ef%bc%8e/admin",
            "/x/\u{ff0e}\u{ff0e}/admin",
            "/v1%ef%bc%8fextract",
            "/admin%e2%80%a4",
            "/%ff",
            "/pv\u{9e}",
            "/a%c2%85",
            "admin",
            "",
            "/admin%3f",
            "/admin%3Fx=1",
            "/admin%23frag",
        ] {
            assert!(check_path(p, true).is_err(), "accepted {p:?}");
        }
    }

    #[test]
    fn look_alike_letters_are_refused_unless_non_ascii_is_allowed() {
        // Full-width a, dotless i, Kelvin sign: read as /admin, /admin, /k by upstreams that
        // fold compatibility forms or case.
        for p in ["/%EF%BD%81dmin", "/adm\u{131}n", "/adm%C4%B1n", "/\u{212a}"] {
            assert!(check_path(p, false).is_err(), "accepted {p:?}");
            assert!(
                check_path(p, true).is_ok(),
                "refused {p:?} with non-ASCII allowed"
            );
        }
        for p in ["/admin", "/a%20b", "/%41dmin", "/v1/x.json"] {
            assert!(check_path(p, false).is_ok(), "refused {p:?}");
        }
    }

    #[test]
    fn accepts_ordinary_paths() {
        for p in [
            "/",
            "/v1/extract",
            "/v1/extract/",
            "/a.b/c",
            "/a%20b",
            "/%41",
            "/a/.well-known",
            "/%20a",
            "/jos%C3%A9",
            "/jos\u{e9}/caf%c3%a9",
            "/%7Euser",
        ] {
            assert!(check_path(p, true).is_ok(), "refused {p:?}");
        }
    }
}
