//! A scripted raw upstream whose answer is chosen by the request path, and a raw HTTP/1.1
//! client: every byte on both sides of the gateway is the test's own, so response framings,
//! interim answers, misbehaving upstreams, stalls and cut-off connections are seen as they are
//! on the wire. Used by the fast path tests and the engine parity suite.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A request as the scripted upstream read it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Which upstream connection it came on (numbered from 0).
    pub conn: usize,
    pub head: String,
    pub body: Vec<u8>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }

    /// The request target (`/path?query`).
    pub fn target(&self) -> &str {
        self.head.split(' ').nth(1).unwrap_or("")
    }

    /// Every field of the head: the name in lowercase, the value trimmed, in order.
    pub fn fields(&self) -> Vec<(String, String)> {
        self.head
            .lines()
            .skip(1)
            .filter_map(|l| {
                let (k, v) = l.split_once(':')?;
                Some((k.to_ascii_lowercase(), v.trim().to_owned()))
            })
            .collect()
    }
}

/// The moment an answer could no longer be written: the gateway closed the upstream
/// connection in the middle of it.
#[derive(Debug, Clone)]
pub struct Cut {
    pub target: String,
    pub at: Instant,
}

#[derive(Clone, Default)]
pub struct Script {
    seen: Arc<Mutex<Vec<Seen>>>,
    cuts: Arc<Mutex<Vec<Cut>>>,
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A pattern body of `n` bytes.
pub fn pattern(n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| b"abcdefghijklmnopqrstuvwxyz0123456789"[i % 36])
        .collect()
}

/// Size of the `/huge` answer: larger than what the loopback socket buffers between the
/// gateway and a client can hold, so a client that stops reading stalls the gateway's writes.
pub const HUGE: usize = 48 << 20;

/// How long the upstream holds a connection it leaves silent (`/stall`, `/hang`, `/early`).
const HOLD: Duration = Duration::from_secs(10);

impl Script {
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The request whose target starts with `prefix` (the last one, when several did).
    pub fn seen_at(&self, prefix: &str) -> Option<Seen> {
        self.seen()
            .into_iter()
            .rev()
            .find(|s| s.target().starts_with(prefix))
    }

    /// When the answer to the request whose target starts with `prefix` was cut off.
    pub fn cut_at(&self, prefix: &str) -> Option<Instant> {
        self.cuts
            .lock()
            .unwrap()
            .iter()
            .find(|c| c.target.starts_with(prefix))
            .map(|c| c.at)
    }

    /// Answers by path:
    /// `/ok` 200 "ok" · `/chunked` a chunked body with an extension and a trailer ·
    /// `/eof` a body delimited by closing · `/interim` 103 then 200 · `/head` 200 with a length
    /// and no body (for HEAD) · `/listed` the same with the length as a list (`100, 100`) ·
    /// `/nocontent` 204 with a `Content-Length` it must not have · `/notmod` 304 · `/hop` hop-by-hop fields and a RateLimit field ·
    /// `/cors` 200 with the upstream's own `Access-Control-*` fields ·
    /// `/big` 1 MiB · `/huge` [`HUGE`] bytes, written as fast as they are taken (a write that
    /// fails is recorded as a [`Cut`]) · `/echo` the request body back · `/drip` a body sent in
    /// two parts · `/switch` an unasked 101 · `/conflict` two lengths · `/garbage` no HTTP at
    /// all · `/gzipped` a transfer coding besides chunked · `/status` status 099 · `/continue`
    /// (POST) `100 Continue` before the body is read, then the body back · `/nothing` closes
    /// without answering · `/bye` 200, then closes the connection silently · `/stall` the head
    /// and 10 of 100 body bytes, then silence · `/hang` reads the request and never answers ·
    /// `/early` 200 "early" as soon as the head is in, without reading the upload, then
    /// silence · `/once` 200 "ok" as the first request of a connection; as a later one, the
    /// connection is closed as soon as its head is in (an upstream closing a kept-alive
    /// connection just as a request arrives).
    pub async fn start(&self) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let me = self.clone();
        tokio::spawn(async move {
            for conn in 0.. {
                let Ok((s, _)) = listener.accept().await else {
                    return;
                };
                let me = me.clone();
                tokio::spawn(async move {
                    let _ = me.serve(s, conn).await;
                });
            }
        });
        addr
    }

    fn record(&self, conn: usize, head: &str, body: &[u8]) {
        self.seen.lock().unwrap().push(Seen {
            conn,
            head: head.to_owned(),
            body: body.to_vec(),
        });
    }

    fn cut(&self, target: &str) {
        self.cuts.lock().unwrap().push(Cut {
            target: target.to_owned(),
            at: Instant::now(),
        });
    }

    async fn serve(&self, mut s: TcpStream, conn: usize) -> std::io::Result<()> {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        for served in 0.. {
            let end = loop {
                if let Some(i) = find(&buf, b"\r\n\r\n") {
                    break i + 4;
                }
                let n = s.read(&mut chunk).await?;
                if n == 0 {
                    return Ok(());
                }
                buf.extend_from_slice(&chunk[..n]);
            };
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end);
            let target = head.split(' ').nth(1).unwrap_or("").to_owned();
            let path = target.split('?').next().unwrap_or("").to_owned();
            if path == "/once" && served > 0 {
                self.record(conn, &head, b"");
                return Ok(());
            }
            if path == "/early" {
                self.record(conn, &head, b"");
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nearly")
                    .await?;
                tokio::time::sleep(HOLD).await;
                return Ok(());
            }
            if head.starts_with("POST /continue ") {
                s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
            }
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            let chunked = head
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked");
            let mut body = Vec::new();
            if chunked {
                // Sizes, data, and the final empty line (no trailers are sent here).
                loop {
                    while find(&buf, b"\r\n").is_none() {
                        let n = s.read(&mut chunk).await?;
                        if n == 0 {
                            return Ok(());
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    let line = find(&buf, b"\r\n").unwrap();
                    let size = usize::from_str_radix(
                        std::str::from_utf8(&buf[..line]).unwrap_or("").trim(),
                        16,
                    )
                    .unwrap_or(0);
                    while buf.len() < line + 2 + size + 2 {
                        let n = s.read(&mut chunk).await?;
                        if n == 0 {
                            return Ok(());
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    body.extend_from_slice(&buf[line + 2..line + 2 + size]);
                    buf.drain(..line + 2 + size + 2);
                    if size == 0 {
                        break;
                    }
                }
            } else {
                while buf.len() < len {
                    let n = s.read(&mut chunk).await?;
                    if n == 0 {
                        return Ok(());
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                body = buf.drain(..len).collect();
            }
            let len = body.len();
            self.record(conn, &head, &body);
            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec();
            let answer: Vec<u8> = match path.as_str() {
                "/chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Up: 1\r\n\r\n\
                    5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
                    .to_vec(),
                "/eof" => {
                    s.write_all(b"HTTP/1.1 200 OK\r\n\r\nuntil ").await?;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    s.write_all(b"the end").await?;
                    return Ok(());
                }
                "/interim" => b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n\
                    HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                    .to_vec(),
                "/head" => b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n".to_vec(),
                "/listed" => b"HTTP/1.1 200 OK\r\ncontent-length: 100, 100\r\n\r\n".to_vec(),
                "/nocontent" => b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n".to_vec(),
                "/notmod" => b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\n\r\n".to_vec(),
                "/cors" => b"HTTP/1.1 200 OK\r\nAccess-Control-Allow-Origin: https://from-upstream.example\r\n\
                    Access-Control-Max-Age: 99999\r\nX-Request-Id: r-1\r\ncontent-length: 2\r\n\r\nok"
                    .to_vec(),
                "/hop" => b"HTTP/1.1 200 OK\r\nConnection: X-Secret\r\nX-Secret: 1\r\n\
                    Keep-Alive: timeout=5\r\nRateLimit-Limit: 999999\r\nUpgrade: h2c\r\n\
                    Proxy-Authenticate: Basic\r\nX-Kept: 1\r\ncontent-length: 2\r\n\r\nok"
                    .to_vec(),
                "/big" => {
                    let mut a = b"HTTP/1.1 200 OK\r\ncontent-length: 1048576\r\n\r\n".to_vec();
                    a.extend(pattern(1 << 20));
                    a
                }
                "/huge" => {
                    let piece = pattern(1 << 20);
                    let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {HUGE}\r\n\r\n");
                    let mut sent = s.write_all(head.as_bytes()).await;
                    for _ in 0..HUGE >> 20 {
                        if sent.is_err() {
                            break;
                        }
                        sent = s.write_all(&piece).await;
                    }
                    if sent.is_err() {
                        self.cut(&target);
                    }
                    return sent;
                }
                "/stall" => {
                    s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
                        .await?;
                    let _ = tokio::time::timeout(HOLD, s.read(&mut chunk)).await;
                    return Ok(());
                }
                "/hang" => {
                    let _ = tokio::time::timeout(HOLD, s.read(&mut chunk)).await;
                    return Ok(());
                }
                "/echo" => {
                    let mut a =
                        format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n").into_bytes();
                    a.extend_from_slice(&body);
                    a
                }
                "/drip" => {
                    s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello")
                        .await?;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    b"world".to_vec()
                }
                "/switch" => b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                    Connection: Upgrade\r\n\r\n"
                    .to_vec(),
                "/conflict" => {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok".to_vec()
                }
                "/garbage" => b"SSH-2.0-OpenSSH\r\n\r\n".to_vec(),
                "/gzipped" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
                    2\r\nxx\r\n0\r\n\r\n"
                    .to_vec(),
                "/status" => b"HTTP/1.1 099 Odd\r\ncontent-length: 0\r\n\r\n".to_vec(),
                "/continue" => {
                    let mut a =
                        format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n").into_bytes();
                    a.extend_from_slice(&body);
                    a
                }
                "/nothing" => return Ok(()),
                "/bye" => {
                    s.write_all(&ok).await?;
                    return Ok(());
                }
                _ => ok,
            };
            if let Err(e) = s.write_all(&answer).await {
                self.cut(&target);
                return Err(e);
            }
        }
        Ok(())
    }
}

/// One response as a client read it.
#[derive(Debug, Clone, Default)]
pub struct Answer {
    pub status: u16,
    /// The head as it came (HTTP/1.1), or written out from the fields (HTTP/2).
    pub head: String,
    /// The fields: names in lowercase, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub trailers: Vec<(String, String)>,
    /// Interim (1xx) statuses received before the answer.
    pub interim: Vec<u16>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }

    /// The problem+json `code` of a gateway's own answer.
    pub fn code(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["code"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }
}

/// The connection or the stream was cut off before the answer was complete.
#[derive(Debug, Clone)]
pub struct Broken(pub String);

/// How long a client waits for more of an answer before the test fails (nothing the gateway
/// does legitimately takes this long in these tests).
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Reads more bytes into `buf`: `Err` when the connection ended or failed.
async fn fill<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> Result<(), Broken> {
    buf.reserve(64 * 1024);
    match tokio::time::timeout(PATIENCE, r.read_buf(buf)).await {
        Ok(Ok(n)) if n > 0 => Ok(()),
        Ok(Ok(_)) => Err(Broken("connection closed".into())),
        Ok(Err(e)) => Err(Broken(format!("connection failed: {e}"))),
        Err(_) => panic!("no bytes within {PATIENCE:?}: the exchange hangs"),
    }
}

/// Reads one final response to a request of `method` from `r` (interim ones are recorded and
/// skipped); `buf` holds what was read and not yet consumed.
pub async fn read_answer<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    method: &str,
) -> Result<Answer, Broken> {
    let mut interim = Vec::new();
    loop {
        let end = loop {
            if let Some(i) = find(buf, b"\r\n\r\n") {
                break i + 4;
            }
            fill(r, buf)
                .await
                .map_err(|b| Broken(format!("{} before a response head", b.0)))?;
        };
        let head = String::from_utf8(buf[..end].to_vec()).unwrap();
        buf.drain(..end);
        let status: u16 = head[9..12].parse().unwrap();
        if status < 200 {
            interim.push(status);
            continue;
        }
        let headers = head
            .lines()
            .skip(1)
            .filter_map(|l| {
                let (k, v) = l.split_once(':')?;
                Some((k.to_ascii_lowercase(), v.trim().to_owned()))
            })
            .collect();
        let mut a = Answer {
            status,
            head,
            headers,
            interim,
            ..Answer::default()
        };
        if method == "HEAD" || status == 204 || status == 304 {
            return Ok(a);
        }
        if let Some(n) = a.header("content-length") {
            let n: usize = n.parse().unwrap();
            while buf.len() < n {
                fill(r, buf).await.map_err(|b| {
                    Broken(format!("{} after {} of {n} body bytes", b.0, buf.len()))
                })?;
            }
            a.body = buf.drain(..n).collect();
            return Ok(a);
        }
        assert_eq!(
            a.header("transfer-encoding").as_deref(),
            Some("chunked"),
            "{}",
            a.head
        );
        loop {
            let line = loop {
                if let Some(i) = find(buf, b"\r\n") {
                    break i;
                }
                fill(r, buf).await?;
            };
            let size = usize::from_str_radix(std::str::from_utf8(&buf[..line]).unwrap(), 16)
                .expect("the gateway writes bare chunk sizes");
            buf.drain(..line + 2);
            if size == 0 {
                // Trailer fields, then the empty line.
                loop {
                    let line = loop {
                        if let Some(i) = find(buf, b"\r\n") {
                            break i;
                        }
                        fill(r, buf).await?;
                    };
                    let text = String::from_utf8(buf.drain(..line + 2).collect()).unwrap();
                    match text.trim_end().split_once(':') {
                        None => return Ok(a),
                        Some((k, v)) => a
                            .trailers
                            .push((k.to_ascii_lowercase(), v.trim().to_owned())),
                    }
                }
            }
            while buf.len() < size + 2 {
                fill(r, buf).await?;
            }
            a.body.extend(buf.drain(..size));
            assert_eq!(buf.drain(..2).collect::<Vec<_>>(), b"\r\n");
        }
    }
}

/// A raw keep-alive client connection.
pub struct Raw {
    pub s: TcpStream,
    pub buf: Vec<u8>,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        Raw {
            s: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.unwrap();
    }

    /// Reads one final response (interim ones are skipped) to the request method `method`.
    pub async fn read(&mut self, method: &str) -> Answer {
        self.try_read(method)
            .await
            .unwrap_or_else(|b| panic!("{b:?}"))
    }

    /// Like [`Raw::read`]; `Err` when the connection ends before the answer is complete.
    pub async fn try_read(&mut self, method: &str) -> Result<Answer, Broken> {
        read_answer(&mut self.s, &mut self.buf, method).await
    }

    /// True when the server closes the connection within `within`.
    pub async fn closes(&mut self, within: Duration) -> bool {
        let mut chunk = [0u8; 1024];
        let deadline = Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline.into(), self.s.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
                Err(_) => return false,
            }
        }
    }
}
