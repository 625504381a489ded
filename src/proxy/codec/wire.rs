//! Writing heads and chunk framing into reusable buffers: no allocation, no formatting
//! machinery, nothing but byte copies.

use std::cell::RefCell;

use bytes::Bytes;
use http::{Response, StatusCode};

use super::head::{Field, Framing, ResponseHead};
use crate::clock::Clock;
use crate::cors::{Cors, Grant};
use crate::keys::IdentityHeaders;
use crate::limit::RateInfo;
use crate::proxy::policy::{self, CachePolicy, Rule, Strip};

/// Appends `n` in decimal.
pub fn decimal(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(crate::proxy::error::digits(n, &mut [0u8; 20]));
}

/// Appends `n` in lowercase hex (a chunk size).
fn hex(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[(n & 15) as usize];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The end of a chunk's data.
pub const CHUNK_END: &[u8] = b"\r\n";
/// The last chunk and the end of a chunked body (no trailers).
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// The size line of a chunk of `len` bytes.
pub fn chunk_start(out: &mut Vec<u8>, len: usize) {
    hex(out, len as u64);
    out.extend_from_slice(b"\r\n");
}

/// How a forwarded request's body is framed to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyOut {
    /// No body (and no length field).
    None,
    Length(u64),
    Chunked,
}

/// What the gateway writes into a forwarded request besides the client's own fields.
pub struct Upstream<'a> {
    pub method: &'a [u8],
    /// `/path?query` sent upstream (a query credential already removed).
    pub target: &'a [u8],
    pub strip: Strip,
    /// The principal's `x-keygate-*` fields.
    pub identity: Option<&'a IdentityHeaders>,
    /// `X-Keygate-Assertion` (signed identity).
    pub assertion: Option<&'a [u8]>,
    /// The client's first `X-Forwarded-For`, extended with the peer.
    pub xff: Option<&'a [u8]>,
    /// The client's `Host` (or authority), sent as `X-Forwarded-Host`.
    pub client_host: Option<&'a [u8]>,
    pub peer_ip: &'a [u8],
    pub proto: &'a [u8],
    /// `Host` of the upstream.
    pub host: &'a [u8],
    pub body: BodyOut,
}

/// Writes the head of the request sent upstream, whichever engine read it: the client's fields
/// that [`policy::forwarded`] keeps, in the client's own spellings and order, then the
/// gateway's own (RFC 9110 §7.6: identity, forwarding, `Host`, the framing).
pub fn request_head(out: &mut Vec<u8>, fields: impl ClientFields, up: &Upstream<'_>) {
    out.extend_from_slice(up.method);
    out.push(b' ');
    out.extend_from_slice(up.target);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    fields.forward(out, up.strip);
    if let Some(id) = up.identity {
        id.write(out);
    }
    if let Some(a) = up.assertion {
        field(out, b"x-keygate-assertion", a);
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    if let Some(prev) = up.xff {
        out.extend_from_slice(prev);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(up.peer_ip);
    out.extend_from_slice(b"\r\nx-forwarded-proto: ");
    out.extend_from_slice(up.proto);
    out.extend_from_slice(b"\r\n");
    if let Some(host) = up.client_host {
        field(out, b"x-forwarded-host", host);
    }
    field(out, b"host", up.host);
    match up.body {
        BodyOut::None => {}
        BodyOut::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        BodyOut::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

/// The client's fields as [`request_head`] takes them: those [`policy::forwarded`] keeps are
/// written as `name: value` and CRLF.
pub trait ClientFields {
    fn forward(self, out: &mut Vec<u8>, strip: Strip);
}

/// Name, value and rule of each field (a header map's).
impl<'f, I> ClientFields for I
where
    I: IntoIterator<Item = (&'f [u8], &'f [u8], Rule)>,
{
    fn forward(self, out: &mut Vec<u8>, strip: Strip) {
        for (name, value, rule) in self {
            if policy::forwarded(rule, strip) {
                field(out, name, value);
            }
        }
    }
}

/// The fields of a head parsed in `buf` ([`spans`]): runs of lines already in the form are
/// copied whole ([`Lines`]).
pub struct Spans<'b> {
    buf: &'b [u8],
    fields: &'b [Field],
}

impl ClientFields for Spans<'_> {
    fn forward(self, out: &mut Vec<u8>, strip: Strip) {
        let mut lines = Lines::default();
        for f in self.fields {
            if policy::forwarded(f.kind, strip) {
                lines.field(out, self.buf, f);
            }
        }
        lines.flush(out, self.buf);
    }
}

/// The fields of a parsed head, as [`request_head`] takes them.
pub fn spans<'b>(buf: &'b [u8], fields: &'b [Field]) -> Spans<'b> {
    Spans { buf, fields }
}

/// How the gateway frames a relayed body to its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Out {
    /// With the upstream's length (or no body).
    AsIs,
    /// Re-chunked (the upstream's body was chunked or close-delimited).
    Chunked,
}

fn status_line(out: &mut Vec<u8>, status: u16, reason: &[u8]) {
    out.extend_from_slice(b"HTTP/1.1 ");
    decimal(out, u64::from(status));
    out.push(b' ');
    let canonical = StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason());
    out.extend_from_slice(canonical.map_or(reason, str::as_bytes));
    out.extend_from_slice(b"\r\n");
}

/// Writes the head relayed to the client: the upstream's end-to-end fields, the gateway's
/// `RateLimit-*` (replacing the upstream's), the CORS fields of a route with CORS (replacing
/// the upstream's; `cors`: the rules, what they grant, the request's `Origin`), the framing,
/// `Date` when missing and `Connection: close` when the connection ends after this response.
#[allow(clippy::too_many_arguments)]
pub fn response_head(
    out: &mut Vec<u8>,
    ubuf: &[u8],
    head: &ResponseHead,
    fields: &[Field],
    own: Option<(&RateInfo, &CachePolicy)>,
    framing: Out,
    close: bool,
    clock: &Clock,
    cors: Option<(&Cors, Grant, &[u8])>,
) {
    let rate = own.map(|(r, _)| r);
    status_line(out, head.status, head.reason.get(ubuf));
    let mut lines = Lines::default();
    for f in fields {
        if policy::relayed(f.kind, rate.is_some())
            && !(cors.is_some() && crate::cors::upstream_owned(f.name.get(ubuf)))
        {
            lines.field(out, ubuf, f);
        }
    }
    lines.flush(out, ubuf);
    if let Some((_, cache)) = own {
        let (private, vary) = cache.additions(fields.iter().map(|f| (f.kind, f.value.get(ubuf))));
        if private {
            out.extend_from_slice(b"cache-control: private\r\n");
        }
        if vary && let Some(v) = &cache.vary {
            field(out, b"vary", v.as_bytes());
        }
    }
    if let Some(r) = rate {
        rate_fields(
            out,
            u64::from(r.limit),
            u64::from(r.remaining),
            r.reset_secs,
        );
        if let Some(n) = r.credits {
            out.extend_from_slice(b"keygate-credits-remaining: ");
            decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        if let Some(n) = r.quota {
            out.extend_from_slice(b"keygate-quota-remaining: ");
            decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
    }
    if let Some((cors, grant, origin)) = cors {
        cors.write(out, grant, origin);
    }
    match (framing, head.framing) {
        (Out::Chunked, _) => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        (Out::AsIs, Framing::Length(n)) => {
            out.extend_from_slice(b"content-length: ");
            decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        (Out::AsIs, _) => {}
    }
    if !head.has_date {
        date_field(out, clock);
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Fields written the way [`field`] writes them, each run of consecutive lines of the head
/// they were parsed from that are already in that form (`name: value` and CRLF) copied as one.
#[derive(Default)]
struct Lines {
    /// `ubuf[start..end]`: lines in the form, not written yet.
    start: usize,
    end: usize,
}

impl Lines {
    fn field(&mut self, out: &mut Vec<u8>, ubuf: &[u8], f: &Field) {
        let (name, value) = (f.name.range(), f.value.range());
        let line = name.start..value.end + 2;
        let as_written = value.start == name.end + 2
            && ubuf.get(name.end..value.start) == Some(b": ")
            && ubuf.get(value.end..line.end) == Some(b"\r\n");
        if !as_written {
            self.flush(out, ubuf);
            field(out, &ubuf[name], &ubuf[value]);
        } else if self.end == line.start && self.end > self.start {
            self.end = line.end;
        } else {
            self.flush(out, ubuf);
            (self.start, self.end) = (line.start, line.end);
        }
    }

    fn flush(&mut self, out: &mut Vec<u8>, ubuf: &[u8]) {
        out.extend_from_slice(&ubuf[self.start..self.end]);
        self.start = self.end;
    }
}

fn rate_fields(out: &mut Vec<u8>, limit: u64, remaining: u64, reset: u64) {
    out.extend_from_slice(b"ratelimit-limit: ");
    decimal(out, limit);
    out.extend_from_slice(b"\r\nratelimit-remaining: ");
    decimal(out, remaining);
    out.extend_from_slice(b"\r\nratelimit-reset: ");
    decimal(out, reset);
    out.extend_from_slice(b"\r\n");
}

/// Writes a response the gateway made itself (an error, the health check), whole.
pub fn own_response(
    out: &mut Vec<u8>,
    res: &Response<Bytes>,
    head_request: bool,
    close: bool,
    clock: &Clock,
) {
    status_line(out, res.status().as_u16(), b"");
    for (name, value) in res.headers() {
        field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    // A 204 (a CORS preflight's answer) has no length field (RFC 9110 §8.6).
    if res.status() != StatusCode::NO_CONTENT {
        out.extend_from_slice(b"content-length: ");
        decimal(out, res.body().len() as u64);
        out.extend_from_slice(b"\r\n");
    }
    date_field(out, clock);
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !head_request {
        out.extend_from_slice(res.body());
    }
}

thread_local! {
    /// The `Date` field of the current second (RFC 9110 §5.6.7 IMF-fixdate).
    static DATE: RefCell<(u64, [u8; 37])> = const { RefCell::new((u64::MAX, [0; 37])) };
}

/// Appends `date: <IMF-fixdate>\r\n` for the clock's current second (formatted once per
/// second).
pub fn date_field(out: &mut Vec<u8>, clock: &Clock) {
    let now = (clock.now_millis() / 1000).max(0) as u64;
    DATE.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.0 != now {
            *cell = (now, imf_fixdate(now));
        }
        out.extend_from_slice(&cell.1);
    });
}

fn imf_fixdate(secs: u64) -> [u8; 37] {
    let text = chrono::DateTime::from_timestamp(secs as i64, 0)
        .unwrap_or_default()
        .format("date: %a, %d %b %Y %H:%M:%S GMT\r\n")
        .to_string();
    let mut out = [b' '; 37];
    let n = text.len().min(37);
    out[..n].copy_from_slice(&text.as_bytes()[..n]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::FakeClock;

    #[test]
    fn numbers() {
        let mut out = Vec::new();
        for n in [0, 7, 10, 255, 1_000_000, u64::MAX] {
            out.clear();
            decimal(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
            out.clear();
            hex(&mut out, n);
            assert_eq!(out, format!("{n:x}").as_bytes());
        }
    }

    fn parsed(raw: &[u8]) -> (super::super::head::RequestHead, Vec<Field>) {
        let mut fields = Vec::new();
        match super::super::head::parse_request(
            raw,
            &crate::proxy::policy::FieldRules::default(),
            100,
            &mut fields,
        ) {
            super::super::head::Parsed::Complete(h) => (h, fields),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn forwarded_request_head() {
        let raw = b"POST /v1/x?a=1 HTTP/1.1\r\nHost: api.example\r\nX-API-Key: kg_secret\r\n\
                    Authorization: Basic abc\r\nContent-Length: 3\r\nConnection: X-Secret\r\n\
                    X-Secret: s\r\nX-Forwarded-For: 10.0.0.1\r\nX-Keygate-Key-Id: spoof\r\n\
                    Accept: */*\r\nX-Tight:v\r\nX-Last: 1\r\n\r\nabc";
        let (head, fields) = parsed(raw);
        let mut out = Vec::new();
        request_head(
            &mut out,
            spans(raw, &fields),
            &Upstream {
                method: b"POST",
                target: head.target.get(raw),
                strip: Strip::API_KEY,
                identity: Some(&IdentityHeaders::new("acme", "k1", "A", "pro")),
                assertion: None,
                xff: head.xff.map(|s| s.get(raw)),
                client_host: head.host.map(|s| s.get(raw)),
                peer_ip: b"127.0.0.1",
                proto: b"http",
                host: b"127.0.0.1:9000",
                body: BodyOut::Length(3),
            },
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /v1/x?a=1 HTTP/1.1\r\nAuthorization: Basic abc\r\nAccept: */*\r\n\
             X-Tight: v\r\nX-Last: 1\r\n\
             x-keygate-client-id: acme\r\nx-keygate-key-id: k1\r\nx-keygate-permissions: A\r\n\
             x-keygate-license: pro\r\nx-forwarded-for: 10.0.0.1, 127.0.0.1\r\n\
             x-forwarded-proto: http\r\nx-forwarded-host: api.example\r\n\
             host: 127.0.0.1:9000\r\ncontent-length: 3\r\n\r\n"
        );

        let raw =
            b"GET /p HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer x\r\nX-API-Key: other\r\n\r\n";
        let (_, fields) = parsed(raw);
        let mut out = Vec::new();
        request_head(
            &mut out,
            spans(raw, &fields),
            &Upstream {
                method: b"GET",
                target: b"/p?b=2",
                strip: Strip::AUTHORIZATION,
                identity: None,
                assertion: None,
                xff: None,
                client_host: None,
                peer_ip: b"::1",
                proto: b"https",
                host: b"up",
                body: BodyOut::Chunked,
            },
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /p?b=2 HTTP/1.1\r\nX-API-Key: other\r\nx-forwarded-for: ::1\r\n\
             x-forwarded-proto: https\r\nhost: up\r\ntransfer-encoding: chunked\r\n\r\n"
        );
    }

    /// `raw` parsed as an upstream's response head and relayed: the head the client gets.
    fn relayed(
        raw: &[u8],
        own: Option<(&RateInfo, &CachePolicy)>,
        framing: Out,
        close: bool,
        clock: &Clock,
    ) -> String {
        let mut fields = Vec::new();
        let head = super::super::head::parse_response(raw, false, &mut fields)
            .unwrap()
            .unwrap();
        let mut out = Vec::new();
        response_head(
            &mut out, raw, &head, &fields, own, framing, close, clock, None,
        );
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn relayed_response_head() {
        let raw = b"HTTP/1.1 201 Whatever\r\nConnection: x-secret\r\nX-Secret: 1\r\n\
                    RateLimit-Limit: 9\r\nTransfer-Encoding: chunked\r\nX-Ok: 1\r\n\r\n";
        let rate = RateInfo {
            limit: 100,
            remaining: 99,
            reset_secs: 1,
            credits: None,
            quota: None,
        };
        let cache = CachePolicy::new(&http::HeaderName::from_static("x-api-key"), true, true);
        let clock = FakeClock::new().clock();
        let text = relayed(raw, Some((&rate, &cache)), Out::Chunked, true, &clock);
        assert!(
            text.starts_with(
                "HTTP/1.1 201 Created\r\nX-Ok: 1\r\ncache-control: private\r\n\
                 vary: authorization, x-api-key\r\nratelimit-limit: 100\r\n\
                 ratelimit-remaining: 99\r\nratelimit-reset: 1\r\ntransfer-encoding: chunked\r\ndate: "
            ),
            "{text}"
        );
        assert!(
            text.ends_with(" GMT\r\nconnection: close\r\n\r\n"),
            "{text}"
        );
        // Without a rate (a public route) the upstream's RateLimit fields pass.
        let text = relayed(raw, None, Out::Chunked, false, &clock);
        assert!(text.contains("RateLimit-Limit: 9\r\n") && !text.contains("connection"));
        assert!(!text.contains("cache-control") && !text.contains("vary"));

        // An upstream that allows shared caching keeps it; `Vary: *` is left alone.
        let raw = b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60, s-maxage=30\r\n\
                    Vary: *\r\nContent-Length: 0\r\n\r\n";
        let text = relayed(raw, Some((&rate, &cache)), Out::AsIs, false, &clock);
        assert!(
            !text.contains("private") && !text.contains("authorization"),
            "{text}"
        );
        assert!(text.contains("Cache-Control: max-age=60, s-maxage=30\r\nVary: *\r\n"));
    }

    /// Relayed fields leave as `name: value` and CRLF whatever form the upstream gave them
    /// (runs of lines already in that form are copied whole), and a field the gateway drops
    /// between two of them ends a run without leaking into it.
    #[test]
    fn relayed_fields_leave_in_one_form() {
        let raw = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Sun, 06 Dec 2026 22:00:00 GMT\r\n\
                    X-A:tight\r\nX-B:   spaced   \r\nConnection: keep-alive\r\nX-C: after\r\n\
                    X-Empty: \r\nX-Lf: bare\nX-D: last\r\nContent-Length: 0\r\nX-E: end\r\n\r\n";
        assert_eq!(
            relayed(raw, None, Out::AsIs, false, &FakeClock::new().clock()),
            "HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Sun, 06 Dec 2026 22:00:00 GMT\r\n\
             X-A: tight\r\nX-B: spaced\r\nX-C: after\r\nX-Empty: \r\nX-Lf: bare\r\n\
             X-D: last\r\nX-E: end\r\ncontent-length: 0\r\n\r\n"
        );
    }

    #[test]
    fn own_responses_are_whole() {
        let res: Response<Bytes> = crate::proxy::error::ProxyError::MissingCredentials.response();
        let clock = FakeClock::new().clock();
        let mut out = Vec::new();
        own_response(&mut out, &res, false, false, &clock);
        let text = String::from_utf8(out).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 401 Unauthorized\r\n"));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        assert!(head.contains("www-authenticate: Bearer realm=\"keygate\""));
        let mut out = Vec::new();
        own_response(&mut out, &res, true, true, &clock);
        let text = String::from_utf8(out).unwrap();
        assert!(text.ends_with("connection: close\r\n\r\n"));
    }

    #[test]
    fn date_is_imf_fixdate() {
        assert_eq!(
            &imf_fixdate(784_111_777),
            b"date: Sun, 06 Nov 1994 08:49:37 GMT\r\n"
        );
        let mut out = Vec::new();
        date_field(&mut out, &Clock::real());
        assert_eq!(out.len(), 37);
        assert!(out.starts_with(b"date: ") && out.ends_with(b" GMT\r\n"));
    }

    /// The `Date` field is the clock's: it follows the clock second by second (the text
    /// formatted once per second is not served past its second).
    #[test]
    fn date_follows_the_clock() {
        let fake = FakeClock::at(784_111_777_000);
        let clock = fake.clock();
        let date = |clock: &Clock| {
            let mut out = Vec::new();
            date_field(&mut out, clock);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(date(&clock), "date: Sun, 06 Nov 1994 08:49:37 GMT\r\n");
        fake.advance(std::time::Duration::from_millis(999));
        assert_eq!(date(&clock), "date: Sun, 06 Nov 1994 08:49:37 GMT\r\n");
        fake.advance(std::time::Duration::from_millis(1));
        assert_eq!(date(&clock), "date: Sun, 06 Nov 1994 08:49:38 GMT\r\n");
        // A gateway answer and a relayed head carry it too.
        let res: Response<Bytes> = crate::proxy::error::ProxyError::MissingCredentials.response();
        let mut out = Vec::new();
        own_response(&mut out, &res, false, false, &clock);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("\r\ndate: Sun, 06 Nov 1994 08:49:38 GMT\r\n"),
            "{text}"
        );
        let text = relayed(
            b"HTTP/1.1 204 No Content\r\n\r\n",
            None,
            Out::AsIs,
            false,
            &clock,
        );
        assert!(
            text.contains("\r\ndate: Sun, 06 Nov 1994 08:49:38 GMT\r\n"),
            "{text}"
        );
    }
}
