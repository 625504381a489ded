//! HTTP/1.1 request and response heads: parsed with `httparse`, every field classified in one
//! walk by the policy core's rules ([`Rule`]), kept as offsets into the connection's buffer
//! (nothing copied). The fast path parses client requests with it; the one upstream client
//! parses every upstream response with it.
//!
//! A request head is either taken by the fast path or handed to hyper ([`Parsed::Handover`]);
//! the fast path takes only the plain case and hands over everything else, so every unusual
//! or malformed message gets exactly the answer hyper gives it:
//!
//! * HTTP/1.1 only; methods GET, HEAD, POST, PUT, DELETE, PATCH and OPTIONS;
//! * an origin-form target (`/path?query`) of unreserved, sub-delim, `:`, `@`, `/`, `%` and
//!   (in the query) `?` characters, at most [`MAX_TARGET`] bytes;
//! * exactly one `Host`, at most one `Content-Length` of plain digits;
//! * no `Transfer-Encoding`, `Expect`, `Upgrade` or `Trailer` field, and no `Connection`
//!   option other than `close`, `keep-alive` and the names of at most [`MAX_CONNECTION_TOKENS`]
//!   fields.
//!
//! What the fast path takes has one unambiguous framing: a body of exactly `Content-Length`
//! bytes, or none.

use std::mem::MaybeUninit;

use http::Method;

use crate::proxy::policy::{self, ConnectionToken, FieldRules, Rule};

/// Longest request target the fast path takes (longer ones go to hyper).
pub const MAX_TARGET: usize = 8 * 1024;
/// Most header fields parsed on the fast path; a request with more goes to hyper, which
/// applies the configured `limits.max_headers`.
pub const MAX_FIELDS: usize = 128;
/// Most field names a `Connection` header may list on the fast path.
pub const MAX_CONNECTION_TOKENS: usize = 8;

/// A byte range of the buffer the head was parsed from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Span {
    pub start: u32,
    pub len: u32,
}

impl Span {
    fn of(base: &[u8], part: &[u8]) -> Span {
        let start = part.as_ptr() as usize - base.as_ptr() as usize;
        Span {
            start: start as u32,
            len: part.len() as u32,
        }
    }

    pub fn get<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        &buf[self.range()]
    }

    pub fn range(&self) -> std::ops::Range<usize> {
        self.start as usize..(self.start + self.len) as usize
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Field {
    pub name: Span,
    pub value: Span,
    pub kind: Rule,
}

/// A request head the fast path takes.
#[derive(Debug, Clone)]
pub struct RequestHead {
    /// Length of the head in bytes (the body, if any, starts here).
    pub len: usize,
    pub method: Method,
    /// `/path?query` as sent.
    pub target: Span,
    /// Length of the path part of `target`.
    pub path_len: u32,
    /// `Some` when the request has a `Content-Length` (possibly 0).
    pub content_length: Option<u64>,
    /// The client asked to close the connection after this exchange.
    pub close: bool,
    pub host: Option<Span>,
    pub xff: Option<Span>,
    pub authorization: Option<Span>,
    pub api_key: Option<Span>,
}

impl RequestHead {
    pub fn path<'b>(&self, buf: &'b [u8]) -> &'b str {
        let t = self.target.get(buf);
        // The target was checked to be ASCII.
        std::str::from_utf8(&t[..self.path_len as usize]).unwrap_or("")
    }

    /// The query, when the target has a `?` (possibly empty, as `http::Uri` reports it).
    pub fn query<'b>(&self, buf: &'b [u8]) -> Option<&'b str> {
        let t = self.target.get(buf);
        let q = t.get(self.path_len as usize + 1..)?;
        Some(std::str::from_utf8(q).unwrap_or(""))
    }

    pub fn body_len(&self) -> u64 {
        self.content_length.unwrap_or(0)
    }
}

/// The result of looking at the start of a connection's buffer.
#[derive(Debug)]
pub enum Parsed {
    /// A complete head the fast path takes.
    Complete(RequestHead),
    /// More bytes are needed.
    Partial,
    /// Hyper takes it from here (see the module documentation).
    Handover,
    /// Refused (400, and the connection closes): `Content-Length` with `Transfer-Encoding`,
    /// a framing two parsers may read two ways (RFC 9112 §6.1; nginx refuses it too).
    Refuse(&'static str),
}

/// What an unusual head becomes: hyper's, unless its framing is ambiguous.
fn hand_over(headers: &[httparse::Header<'_>]) -> Parsed {
    let has = |name: &[u8]| {
        headers
            .iter()
            .any(|h| h.name.len() == name.len() && h.name.as_bytes().eq_ignore_ascii_case(name))
    };
    if has(b"transfer-encoding") && has(b"content-length") {
        Parsed::Refuse("Content-Length and Transfer-Encoding in one request")
    } else {
        Parsed::Handover
    }
}

/// Bytes allowed in a path on the fast path (a subset of what `http::Uri` accepts).
fn path_byte(b: u8) -> bool {
    matches!(b,
        b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9'
        | b'-' | b'.' | b'_' | b'~' | b'!' | b'$' | b'&' | b'\'' | b'(' | b')'
        | b'*' | b'+' | b',' | b';' | b'=' | b':' | b'@' | b'/' | b'%')
}

fn query_byte(b: u8) -> bool {
    path_byte(b) || b == b'?'
}

fn method_of(m: &str) -> Option<Method> {
    Some(match m {
        "GET" => Method::GET,
        "HEAD" => Method::HEAD,
        "POST" => Method::POST,
        "PUT" => Method::PUT,
        "DELETE" => Method::DELETE,
        "PATCH" => Method::PATCH,
        "OPTIONS" => Method::OPTIONS,
        _ => return None,
    })
}

/// `Content-Length` value: plain decimal digits (at most 18, so it fits any body we stream).
pub fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// The `Connection` options of a message: `close`, and the names it lists.
#[derive(Default)]
struct ConnectionOptions {
    close: bool,
    keep_alive: bool,
    upgrade: bool,
    names: [Span; MAX_CONNECTION_TOKENS],
    count: usize,
    too_many: bool,
}

impl ConnectionOptions {
    fn add(&mut self, base: &[u8], value: &[u8]) {
        for token in policy::connection_tokens(value) {
            match token {
                ConnectionToken::Close => self.close = true,
                ConnectionToken::KeepAlive => self.keep_alive = true,
                ConnectionToken::Upgrade => self.upgrade = true,
                ConnectionToken::Names(name) if self.count < MAX_CONNECTION_TOKENS => {
                    self.names[self.count] = Span::of(base, name);
                    self.count += 1;
                }
                ConnectionToken::Names(_) => self.too_many = true,
            }
        }
    }

    /// Marks the fields named by `Connection` as dropped (except the length, which the gateway
    /// writes itself).
    fn apply(&self, buf: &[u8], fields: &mut [Field]) {
        if self.count == 0 {
            return;
        }
        for f in fields.iter_mut() {
            if f.kind == Rule::Drop || f.kind == Rule::ContentLength {
                continue;
            }
            let name = f.name.get(buf);
            if self.names[..self.count]
                .iter()
                .any(|t| t.get(buf).eq_ignore_ascii_case(name))
            {
                f.kind = Rule::Drop;
            }
        }
    }
}

/// Parses and classifies the request head at the start of `buf` by `rules`; a head with more than `max_fields` fields (at
/// most [`MAX_FIELDS`]) goes to hyper. `fields` is cleared and receives every field.
pub fn parse_request(
    buf: &[u8],
    rules: &FieldRules,
    max_fields: usize,
    fields: &mut Vec<Field>,
) -> Parsed {
    fields.clear();
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut []);
    let slots = &mut slots[..max_fields.min(MAX_FIELDS)];
    let len = match req.parse_with_uninit_headers(buf, slots) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Handover,
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return hand_over(req.headers);
    };
    let Some(method) = method_of(method) else {
        return hand_over(req.headers);
    };
    let t = target.as_bytes();
    if t.first() != Some(&b'/') || t.len() > MAX_TARGET {
        return hand_over(req.headers);
    }
    let path_len = t.iter().position(|&b| b == b'?').unwrap_or(t.len());
    if !t[..path_len].iter().all(|&b| path_byte(b))
        || !t[path_len..].iter().skip(1).all(|&b| query_byte(b))
    {
        return hand_over(req.headers);
    }
    let mut head = RequestHead {
        len,
        method,
        target: Span::of(buf, t),
        path_len: path_len as u32,
        content_length: None,
        close: false,
        host: None,
        xff: None,
        authorization: None,
        api_key: None,
    };
    let mut conn = ConnectionOptions::default();
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let kind = match rules.request(name) {
            Rule::Host => {
                if head.host.is_some() {
                    return hand_over(req.headers);
                }
                head.host = Some(Span::of(buf, h.value));
                Rule::Host
            }
            Rule::ContentLength => {
                if head.content_length.is_some() {
                    return hand_over(req.headers);
                }
                match parse_length(h.value) {
                    Some(n) => head.content_length = Some(n),
                    None => return hand_over(req.headers),
                }
                Rule::ContentLength
            }
            Rule::TransferEncoding | Rule::Expect | Rule::Upgrade | Rule::Trailer => {
                return hand_over(req.headers);
            }
            Rule::Connection => {
                conn.add(buf, h.value);
                Rule::Drop
            }
            // More than one: hyper's engine refuses it (rare).
            Rule::Authorization if head.authorization.is_some() => return hand_over(req.headers),
            Rule::Authorization => {
                head.authorization = Some(Span::of(buf, h.value));
                Rule::Authorization
            }
            // More than one: hyper's engine refuses it (rare).
            Rule::ApiKey if head.api_key.is_some() => return hand_over(req.headers),
            Rule::ApiKey => {
                head.api_key = Some(Span::of(buf, h.value));
                Rule::ApiKey
            }
            // Lines to join into one list: hyper's engine does it (rare).
            Rule::XForwardedFor if head.xff.is_some() => return hand_over(req.headers),
            Rule::XForwardedFor => {
                head.xff = Some(Span::of(buf, h.value));
                Rule::XForwardedFor
            }
            other => other,
        };
        fields.push(Field {
            name: Span::of(buf, name),
            value: Span::of(buf, h.value),
            kind,
        });
    }
    // No `Host` (RFC 9112 §3.2: an HTTP/1.1 request has exactly one): hyper's engine refuses it.
    if conn.upgrade || conn.too_many || head.host.is_none() {
        return hand_over(req.headers);
    }
    conn.apply(buf, fields);
    // A field named by `Connection` is not this request's to forward, nor to read from.
    for (slot, kind) in [
        (&mut head.host, Rule::Host),
        (&mut head.xff, Rule::XForwardedFor),
    ] {
        if slot.is_some() && !fields.iter().any(|f| f.kind == kind) {
            *slot = None;
        }
    }
    head.close = conn.close;
    Parsed::Complete(head)
}

/// How the body of a response is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (a response to HEAD, 1xx, 204, 304).
    Empty,
    Length(u64),
    Chunked,
    /// Until the upstream closes the connection.
    Close,
}

/// A response head from an upstream.
#[derive(Debug, Clone)]
pub struct ResponseHead {
    pub len: usize,
    pub status: u16,
    pub reason: Span,
    pub framing: Framing,
    /// The connection may carry another request after this response.
    pub keep_alive: bool,
    pub has_date: bool,
}

/// Why an upstream's response head was refused (502).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadResponse {
    #[error("malformed response head: {0}")]
    Parse(httparse::Error),
    #[error("conflicting Content-Length values")]
    Length,
    #[error("a transfer coding other than chunked, or on an HTTP/1.0 response")]
    Encoding,
    #[error("status {0} is no HTTP status")]
    Status(u16),
}

/// Parses the response head at the start of `buf` (`Ok(None)`: more bytes needed). `head`
/// tells whether the request was a HEAD. `fields` receives every field.
pub fn parse_response(
    buf: &[u8],
    head_request: bool,
    fields: &mut Vec<Field>,
) -> Result<Option<ResponseHead>, BadResponse> {
    fields.clear();
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
    let mut res = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut res, buf, &mut slots)
    {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(BadResponse::Parse(e)),
    };
    let status = res.code.unwrap_or(0);
    if status < 100 {
        return Err(BadResponse::Status(status));
    }
    let http11 = res.version == Some(1);
    let mut length: Option<u64> = None;
    let mut chunked = None;
    let mut has_date = false;
    let mut conn = ConnectionOptions::default();
    for h in res.headers.iter() {
        let name = h.name.as_bytes();
        let kind = match policy::response_rule(name) {
            Rule::ContentLength => {
                // Repeated or listed values must all agree (RFC 9110 §8.6).
                for v in h.value.split(|&b| b == b',') {
                    let n = parse_length(v.trim_ascii()).ok_or(BadResponse::Length)?;
                    if length.is_some_and(|l| l != n) {
                        return Err(BadResponse::Length);
                    }
                    length = Some(n);
                }
                Rule::ContentLength
            }
            Rule::TransferEncoding => {
                // Only `chunked`, once: a body under another transfer coding (gzip…) cannot be
                // relayed without it, and relaying the coding is not supported.
                let only_chunked = h.value.trim_ascii().eq_ignore_ascii_case(b"chunked");
                if !http11 || chunked.is_some() || !only_chunked {
                    return Err(BadResponse::Encoding);
                }
                chunked = Some(true);
                Rule::Drop
            }
            Rule::Connection => {
                conn.add(buf, h.value);
                Rule::Drop
            }
            Rule::Date => {
                has_date = true;
                Rule::Date
            }
            other => other,
        };
        fields.push(Field {
            name: Span::of(buf, name),
            value: Span::of(buf, h.value),
            kind,
        });
    }
    // Field names listed beyond MAX_CONNECTION_TOKENS cannot be dropped: such a response is
    // refused rather than relayed with fields the upstream meant for this hop only.
    if conn.too_many {
        return Err(BadResponse::Parse(httparse::Error::TooManyHeaders));
    }
    conn.apply(buf, fields);
    let mut keep_alive = if http11 {
        !conn.close
    } else {
        conn.keep_alive && !conn.close
    };
    let framing = if head_request || (100..200).contains(&status) || status == 204 || status == 304
    {
        Framing::Empty
    } else {
        match (chunked, length) {
            (Some(_), l) => {
                // Transfer-Encoding overrides Content-Length; such a connection is not reused.
                if l.is_some() {
                    keep_alive = false;
                }
                Framing::Chunked
            }
            (None, None) => {
                keep_alive = false;
                Framing::Close
            }
            (None, Some(n)) => Framing::Length(n),
        }
    };
    // The gateway writes the length of a body it relays itself, once; a bodiless answer keeps
    // the upstream's first length (what a GET would have returned) when it is one plain number,
    // nothing else: no length on a 1xx or 204, no list (`5, 5`) (RFC 9110 §8.6; HTTP/2 clients
    // reset the stream for either).
    let mut keep = framing == Framing::Empty && !(100..200).contains(&status) && status != 204;
    for f in fields.iter_mut() {
        if f.kind == Rule::ContentLength
            && !(std::mem::take(&mut keep)
                && f.value.get(buf).trim_ascii().iter().all(u8::is_ascii_digit))
        {
            f.kind = Rule::Drop;
        }
    }
    Ok(Some(ResponseHead {
        len,
        status,
        reason: res
            .reason
            .filter(|r| !r.is_empty())
            .map_or(Span::default(), |r| Span::of(buf, r.as_bytes())),
        framing,
        keep_alive,
        has_date,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> (Parsed, Vec<Field>) {
        let mut fields = Vec::new();
        let p = parse_request(
            raw.as_bytes(),
            &FieldRules::default(),
            MAX_FIELDS,
            &mut fields,
        );
        (p, fields)
    }

    fn complete(raw: &str) -> (RequestHead, Vec<(String, Rule)>) {
        let (p, fields) = parse(raw);
        let Parsed::Complete(h) = p else {
            panic!("not taken: {raw:?} → {p:?}")
        };
        let kinds = fields
            .iter()
            .map(|f| {
                let name = String::from_utf8(f.name.get(raw.as_bytes()).to_vec()).unwrap();
                (name, f.kind)
            })
            .collect();
        (h, kinds)
    }

    #[test]
    fn plain_requests_are_taken_and_classified() {
        let raw = "POST /v1/x?a=1&b=/?c HTTP/1.1\r\nHost: api\r\nX-API-Key: kg_1\r\n\
                   Authorization: Bearer t\r\nContent-Length: 5\r\nConnection: keep-alive, X-Secret\r\n\
                   X-Secret: s\r\nx-forwarded-for: 10.0.0.1\r\n\
                   X-Forwarded-Host: evil\r\nX-Keygate-Client-Id: spoof\r\nX_Custom: u\r\n\
                   TE: trailers\r\nKeep-Alive: 5\r\nProxy-Authorization: Basic x\r\nAccept: */*\r\n\r\nhello";
        let (h, kinds) = complete(raw);
        let b = raw.as_bytes();
        assert_eq!(h.len, raw.len() - 5);
        assert_eq!(h.method, Method::POST);
        assert_eq!(h.path(b), "/v1/x");
        assert_eq!(h.query(b), Some("a=1&b=/?c"));
        assert_eq!(h.content_length, Some(5));
        assert!(!h.close);
        assert_eq!(h.host.unwrap().get(b), b"api");
        assert_eq!(h.xff.unwrap().get(b), b"10.0.0.1");
        assert_eq!(h.api_key.unwrap().get(b), b"kg_1");
        assert_eq!(h.authorization.unwrap().get(b), b"Bearer t");
        use Rule::*;
        let want = [
            ("Host", Host),
            ("X-API-Key", ApiKey),
            ("Authorization", Authorization),
            ("Content-Length", ContentLength),
            ("Connection", Drop),
            ("X-Secret", Drop),
            ("x-forwarded-for", XForwardedFor),
            ("X-Forwarded-Host", Drop),
            ("X-Keygate-Client-Id", Drop),
            ("X_Custom", Drop),
            ("TE", Drop),
            ("Keep-Alive", Drop),
            ("Proxy-Authorization", Drop),
            ("Accept", Forward),
        ];
        let want: Vec<(String, Rule)> = want.iter().map(|(n, k)| (n.to_string(), *k)).collect();
        assert_eq!(kinds, want);
    }

    #[test]
    fn connection_close_and_named_fields() {
        let (h, kinds) = complete(
            "GET / HTTP/1.1\r\nConnection: close, host, x-forwarded-for, content-length\r\n\
             Host: a\r\nX-Forwarded-For: 1.2.3.4\r\nContent-Length: 0\r\n\r\n",
        );
        assert!(h.close);
        // Named fields are neither forwarded nor read; the length is the gateway's own.
        assert!(h.host.is_none() && h.xff.is_none());
        assert_eq!(h.content_length, Some(0));
        assert_eq!(kinds[1].1, Rule::Drop);
        assert_eq!(kinds[2].1, Rule::Drop);
        assert_eq!(kinds[3].1, Rule::ContentLength);
        let raw = "GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        let (h, _) = complete(raw);
        assert_eq!(h.query(raw.as_bytes()), None);
        let raw = "GET /p? HTTP/1.1\r\nHost: a\r\n\r\n";
        let (h, _) = complete(raw);
        assert_eq!(h.query(raw.as_bytes()), Some(""));
    }

    #[test]
    fn everything_unusual_goes_to_hyper() {
        for raw in [
            // No Host: hyper's engine answers 400 (as it does to two).
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nX-Host: a\r\n\r\n",
            "GET / HTTP/1.0\r\n\r\n",
            "GET / HTTP/2.0\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "TRACE / HTTP/1.1\r\nHost: a\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /a#f HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /a\"b HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /a{b} HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /caf\u{e9} HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /?q=<x> HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            // More than one Authorization or API-key field: refused by hyper's engine.
            "GET / HTTP/1.1\r\nHost: a\r\nAuthorization: Digest x\r\nAuthorization: Bearer y\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX-API-Key: x\r\nx-api-key: y\r\n\r\n",
            // Lines of one list: joined by hyper's engine.
            "GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: a\r\nx-forwarded-for: b\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: \r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000000000000000000\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\ntransfer-encoding: identity\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nTrailer: x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: a,b,c,d,e,f,g,h,i\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX : a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX: a\0b\r\n\r\n",
            "GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
            "get / HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            let (p, _) = parse(raw);
            assert!(matches!(p, Parsed::Handover), "taken: {raw:?}");
        }
        let too_many: String = (0..MAX_FIELDS + 1)
            .map(|i| format!("X-{i}: v\r\n"))
            .collect();
        let (p, _) = parse(&format!("GET / HTTP/1.1\r\nHost: a\r\n{too_many}\r\n"));
        assert!(matches!(p, Parsed::Handover));
        let mut fields = Vec::new();
        let few = "GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\n\r\n";
        assert!(matches!(
            parse_request(few.as_bytes(), &FieldRules::default(), 2, &mut fields),
            Parsed::Handover
        ));
    }

    #[test]
    fn partial_heads_wait_for_more() {
        let raw = "GET /a HTTP/1.1\r\nHost: a\r\nX-API-Key: k\r\n\r\n";
        for end in 0..raw.len() {
            let (p, _) = parse(&raw[..end]);
            assert!(matches!(p, Parsed::Partial), "{:?}", &raw[..end]);
        }
    }

    fn response(raw: &str, head_request: bool) -> Result<Option<ResponseHead>, BadResponse> {
        parse_response(raw.as_bytes(), head_request, &mut Vec::new())
    }

    #[test]
    fn response_framing() {
        let r = |raw: &str| response(raw, false).unwrap().unwrap();
        let ok = r("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        assert_eq!((ok.framing, ok.keep_alive), (Framing::Length(2), true));
        let ok = r("HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\nContent-Length: 2\r\n\r\n");
        assert_eq!(ok.framing, Framing::Length(2));
        let c = r("HTTP/1.1 200 OK\r\nTransfer-Encoding:  Chunked \r\n\r\n");
        assert_eq!((c.framing, c.keep_alive), (Framing::Chunked, true));
        let both = r("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n");
        assert_eq!((both.framing, both.keep_alive), (Framing::Chunked, false));
        let eof = r("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!((eof.framing, eof.keep_alive), (Framing::Close, false));
        let close = r("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
        assert!(!close.keep_alive);
        let old = r("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n");
        assert!(!old.keep_alive);
        let old = r("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n");
        assert!(old.keep_alive);
        for (raw, status) in [
            ("HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n", 204),
            (
                "HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
                304,
            ),
            ("HTTP/1.1 103 Early Hints\r\n\r\n", 103),
        ] {
            let h = r(raw);
            assert_eq!(
                (h.status, h.framing, h.keep_alive),
                (status, Framing::Empty, true)
            );
        }
        let head = response("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", true)
            .unwrap()
            .unwrap();
        assert_eq!(head.framing, Framing::Empty);
        assert!(
            response("HTTP/1.1 200 OK\r\nContent-Le", false)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn malformed_responses_are_refused() {
        for raw in [
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTP/1.1 060 OK\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 000 OK\r\n\r\n",
            "NOT HTTP\r\n\r\n",
            "HTTP/1.1 200 OK\r\nConnection: a,b,c,d,e,f,g,h,i\r\n\r\n",
        ] {
            assert!(response(raw, false).is_err(), "accepted {raw:?}");
        }
    }

    #[test]
    fn response_fields() {
        let raw = "HTTP/1.1 200 OK\r\nConnection: x-secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\n\
                   RateLimit-Limit: 9\r\nDate: x\r\nContent-Length: 0\r\nUpgrade: h2c\r\nX-Ok: 1\r\n\r\n";
        let mut fields = Vec::new();
        let h = parse_response(raw.as_bytes(), false, &mut fields)
            .unwrap()
            .unwrap();
        assert!(h.has_date);
        let kinds: Vec<Rule> = fields.iter().map(|f| f.kind).collect();
        use Rule::*;
        // The length of a relayed body is written by the gateway itself.
        assert_eq!(
            kinds,
            [Drop, Drop, Drop, RateLimit, Date, Drop, Drop, Forward]
        );
        let head = "HTTP/1.1 200 OK\r\nContent-Length: 7\r\nContent-Length: 7\r\n\r\n";
        parse_response(head.as_bytes(), true, &mut fields)
            .unwrap()
            .unwrap();
        let kinds: Vec<Rule> = fields.iter().map(|f| f.kind).collect();
        assert_eq!(kinds, [ContentLength, Drop]);
    }
}
