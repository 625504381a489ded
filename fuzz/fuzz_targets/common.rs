//! Shared by the targets: a header map from fuzz bytes ("name: value" lines).
use http::{HeaderMap, HeaderName, HeaderValue};

/// Builds a header map from `name:value` lines (invalid names or values are skipped, as
/// hyper would have refused them) and returns what follows a blank line as the query string.
pub fn headers(data: &[u8]) -> (HeaderMap, Option<&str>) {
    let mut h = HeaderMap::new();
    let (head, query) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&data[..i], std::str::from_utf8(&data[i + 2..]).ok()),
        None => (data, None),
    };
    for line in head.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        h.append(name, value);
    }
    (h, query)
}
