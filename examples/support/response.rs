//! Reading an HTTP/1.1 answer off a byte buffer, for the open-loop load examples.

use std::io;

/// The length of a whole response at the start of `buf`, if it is all there. A response must
/// be framed by `Content-Length` (or have no body): a chunked one is refused rather than
/// miscounted.
pub fn response_len(buf: &[u8]) -> io::Result<Option<usize>> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4) else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..end])
        .map_err(|_| io::Error::other("a response head that is not UTF-8"))?;
    let mut body = 0;
    for (name, value) in head.lines().filter_map(|l| l.split_once(':')) {
        if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(io::Error::other(
                "a response with Transfer-Encoding: only Content-Length framing is read",
            ));
        }
        if name.eq_ignore_ascii_case("content-length") {
            body = value
                .trim()
                .parse::<usize>()
                .map_err(|_| io::Error::other("a response with a bad Content-Length"))?;
        }
    }
    Ok((buf.len() >= end + body).then_some(end + body))
}
