//! Shared fixtures of the hostile-input tests: the real `keygate` binary in a child process
//! (through [`crate::support::binary`]), a raw recording upstream that parses every byte the gateway sends it (and flags anything an
//! upstream could read two ways), a raw-socket client, and the figures report.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::binary::{Binary, Launch};

pub const ADMIN_KEY: &str = crate::support::ADMIN_KEY;
const JWT_SECRET: &str = "hostile-tests-jwt-secret-0123456789abcdef";

/// The real binary serving `config` from `dir` as every hostile test runs it (JSON logs, a
/// fixed token secret); `.spawn()` starts it.
pub fn keygate(config: &str, dir: &Path) -> Launch {
    Binary::serve(config, dir)
        .json_logs()
        .env("KEYGATE_JWT_SECRET", JWT_SECRET)
}

/// The config every hostile test starts from: SQLite in `dir`, generous limits for the test's
/// own traffic (failed authentications are part of the corpus), `extra` appended.
pub fn config(upstream: &str, dir: &Path, extra: &str) -> String {
    let store = format!("sqlite://{}", dir.join("keygate.db").display());
    config_with_store(upstream, &store, extra)
}

/// [`config`] with any store URL (`sqlite://…`, `redis://…`).
pub fn config_with_store(upstream: &str, store: &str, extra: &str) -> String {
    format!(
        r#"
[proxy]
listen = "127.0.0.1:0"
upstream = "{upstream}"
connect_timeout_ms = 1000
upstream_timeout_ms = 3000
[admin]
listen = "127.0.0.1:0"
keys = ["{ADMIN_KEY}"]
[store]
url = "{store}"
[keys]
max_per_client = 0
[rate_limit]
default = {{ per_second = 100000, burst = 100000 }}
failed_auth = {{ per_second = 100000, burst = 100000 }}
[plans.pro]
rate_limit = {{ per_second = 100000, burst = 100000 }}
[log]
access_log = false
{extra}
"#
    )
}

/// Raises this process's open-file limit (children inherit it). Fails the test with a clear
/// message when the hard limit is too low and cannot be raised.
pub fn raise_nofile(want: u64) {
    let pid = std::process::id().to_string();
    let ok = Command::new("prlimit")
        .args(["--pid", &pid, &format!("--nofile={want}:{want}")])
        .status()
        .is_ok_and(|s| s.success())
        || Command::new("prlimit")
            .args(["--pid", &pid, &format!("--nofile={want}:")])
            .status()
            .is_ok_and(|s| s.success());
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let soft: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        .unwrap_or(0);
    assert!(
        ok && soft >= want,
        "this test needs {want} open files (prlimit from util-linux, and a hard limit of at least {want}); soft limit is {soft}"
    );
}

// ---------------------------------------------------------------------------------------------
// Admin calls over a plain hyper client.

pub async fn admin_call(
    admin: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let mut b = http::Request::builder()
        .method(method)
        .uri(format!("http://{admin}{path}"))
        .header("x-admin-key", ADMIN_KEY);
    let body = match body {
        Some(v) => {
            b = b.header("content-type", "application/json");
            bytes::Bytes::from(v.to_string())
        }
        None => bytes::Bytes::new(),
    };
    let res = client
        .request(b.body(http_body_util::Full::new(body)).unwrap())
        .await
        .unwrap();
    let status = res.status().as_u16();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Creates a client and a key with `permissions`; returns (key, key id).
pub async fn make_key(admin: SocketAddr, client: &str, permissions: &[&str]) -> (String, String) {
    let (s, _) = admin_call(
        admin,
        "POST",
        "/v1/clients",
        Some(serde_json::json!({"client_id": client, "license": "pro"})),
    )
    .await;
    assert!(s == 201 || s == 409, "client create: {s}");
    let (s, v) = admin_call(
        admin,
        "POST",
        "/v1/api-keys",
        Some(
            serde_json::json!({"name": "hostile", "client_id": client, "permissions": permissions}),
        ),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    (
        v["key"].as_str().unwrap().to_owned(),
        v["id"].as_str().unwrap().to_owned(),
    )
}

// ---------------------------------------------------------------------------------------------
// Raw recording upstream.

/// One request as the upstream read it off the wire.
#[derive(Debug, Clone)]
pub struct RawSeen {
    /// Which upstream listener (route) received it.
    pub label: &'static str,
    /// The request target, byte for byte.
    pub target: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// Everything that makes the request ambiguous or unsafe for an upstream.
    pub problems: Vec<String>,
}

impl RawSeen {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    pub fn target_str(&self) -> String {
        String::from_utf8_lossy(&self.target).into_owned()
    }
}

/// Raw bytes that reached an upstream but could not be read as a request at all.
#[derive(Debug, Clone)]
pub struct Garbage {
    pub label: &'static str,
    pub bytes: Vec<u8>,
    pub why: String,
}

#[derive(Clone, Default)]
pub struct Recorder {
    pub seen: Arc<Mutex<Vec<RawSeen>>>,
    pub garbage: Arc<Mutex<Vec<Garbage>>>,
}

impl Recorder {
    pub fn seen(&self) -> Vec<RawSeen> {
        self.seen.lock().unwrap().clone()
    }
    pub fn garbage(&self) -> Vec<Garbage> {
        self.garbage.lock().unwrap().clone()
    }
}

/// Starts an upstream listener that records into `rec` under `label`. Requests whose target
/// contains `/early/` are answered as soon as their head is read (the body is drained after);
/// every other request is answered once its whole body has been read. The answer is always
/// `200` with body `ok`.
pub async fn raw_upstream(rec: &Recorder, label: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let rec = rec.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let rec = rec.clone();
            tokio::spawn(async move {
                let _ = serve_raw(stream, label, rec).await;
            });
        }
    });
    addr
}

const FRAMING: [&str; 2] = ["content-length", "transfer-encoding"];
/// Request headers a gateway must never forward (hop-by-hop, RFC 9110 §7.6.1).
const NEVER_FORWARDED: [&str; 7] = [
    "connection",
    "close",
    "keep-alive",
    "proxy-connection",
    "te",
    "upgrade",
    "proxy-authorization",
];

/// What an upstream's framing checks flag in a head.
fn head_problems(headers: &[(String, Vec<u8>)]) -> Vec<String> {
    let mut p = Vec::new();
    let count = |n: &str| {
        headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(n))
            .count()
    };
    let cl = count("content-length");
    let te = count("transfer-encoding");
    if cl > 1 {
        p.push(format!("{cl} Content-Length fields"));
    }
    if te > 1 {
        p.push(format!("{te} Transfer-Encoding fields"));
    }
    if cl > 0 && te > 0 {
        p.push("both Content-Length and Transfer-Encoding".into());
    }
    for (k, v) in headers {
        let lower = k.to_ascii_lowercase();
        // A name a lenient parser could read as a framing field: other case, `_` for `-`
        // (CGI-style servers), whitespace or junk bytes around it.
        let squeezed: String = lower
            .chars()
            .map(|c| if c == '_' { '-' } else { c })
            .filter(|c| c.is_ascii_alphabetic() || *c == '-')
            .collect();
        if FRAMING.contains(&squeezed.trim_matches('-')) && !FRAMING.contains(&lower.as_str()) {
            p.push(format!("framing look-alike field {k:?}"));
        }
        if squeezed.starts_with("x-keygate-") && lower != squeezed {
            p.push(format!("identity look-alike field {k:?}"));
        }
        if lower == "transfer-encoding" && !v.eq_ignore_ascii_case(b"chunked") {
            p.push(format!(
                "Transfer-Encoding {:?} is not exactly chunked",
                String::from_utf8_lossy(v)
            ));
        }
        if lower == "content-length" && (v.is_empty() || !v.iter().all(u8::is_ascii_digit)) {
            p.push(format!(
                "Content-Length {:?} is not a plain number",
                String::from_utf8_lossy(v)
            ));
        }
        if NEVER_FORWARDED.contains(&lower.as_str()) {
            p.push(format!("hop-by-hop field {k} forwarded"));
        }
        if v.iter()
            .any(|&b| b == b'\r' || b == b'\n' || b == 0 || b == 0x7f)
        {
            p.push(format!("control byte in field {k}"));
        }
    }
    p
}

async fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    let mut chunk = [0u8; 16 * 1024];
    let n = s.read(&mut chunk).await?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n > 0)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn serve_raw(mut s: TcpStream, label: &'static str, rec: Recorder) -> std::io::Result<()> {
    let mut buf = Vec::new();
    loop {
        // Head.
        let end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > 1 << 20 {
                rec.garbage.lock().unwrap().push(Garbage {
                    label,
                    bytes: buf.clone(),
                    why: "head over 1 MiB".into(),
                });
                return Ok(());
            }
            if !read_more(&mut s, &mut buf).await? {
                if !buf.is_empty() {
                    rec.garbage.lock().unwrap().push(Garbage {
                        label,
                        bytes: buf.clone(),
                        why: "incomplete head at close".into(),
                    });
                }
                return Ok(());
            }
        };
        let head: Vec<u8> = buf.drain(..end).collect();
        let mut hs = [httparse::EMPTY_HEADER; 256];
        let mut req = httparse::Request::new(&mut hs);
        let parsed = req.parse(&head);
        let Ok(httparse::Status::Complete(_)) = parsed else {
            rec.garbage.lock().unwrap().push(Garbage {
                label,
                bytes: head.clone(),
                why: format!("unparseable head: {parsed:?}"),
            });
            return Ok(());
        };
        let headers: Vec<(String, Vec<u8>)> = req
            .headers
            .iter()
            .map(|h| (h.name.to_owned(), h.value.to_vec()))
            .collect();
        let mut problems = head_problems(&headers);
        if req.version != Some(1) {
            problems.push(format!("HTTP/1.{:?} request", req.version));
        }
        let target = req.path.unwrap_or("").as_bytes().to_vec();
        let seen = RawSeen {
            label,
            target: target.clone(),
            headers: headers.clone(),
            problems: problems.clone(),
        };
        let idx = {
            let mut v = rec.seen.lock().unwrap();
            v.push(seen);
            v.len() - 1
        };
        let ambiguous = problems.iter().any(|p| {
            p.contains("Content-Length") || p.contains("Transfer-Encoding") || p.contains("framing")
        });
        if ambiguous {
            // An upstream cannot know where this request ends: stop reading this connection.
            return Ok(());
        }
        let early = find(&target, b"/early/").is_some();
        if early {
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await?;
        }
        // Body.
        let get = |n: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(n))
                .map(|(_, v)| v.clone())
        };
        if let Some(te) = get("transfer-encoding") {
            debug_assert!(te.eq_ignore_ascii_case(b"chunked"));
            loop {
                let line_end = loop {
                    if let Some(i) = find(&buf, b"\r\n") {
                        break i;
                    }
                    if buf.len() > 64 * 1024 || !read_more(&mut s, &mut buf).await? {
                        return Ok(());
                    }
                };
                let line: Vec<u8> = buf.drain(..line_end + 2).collect();
                let size_part = &line[..line_end];
                let size_hex = size_part.split(|&b| b == b';').next().unwrap_or(b"");
                let Some(size) = std::str::from_utf8(size_hex)
                    .ok()
                    .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_hexdigit()))
                    .and_then(|h| usize::from_str_radix(h, 16).ok())
                else {
                    rec.seen.lock().unwrap()[idx].problems.push(format!(
                        "bad chunk size line {:?}",
                        String::from_utf8_lossy(&line)
                    ));
                    return Ok(());
                };
                if size == 0 {
                    // Trailers, up to the empty line.
                    loop {
                        let e = loop {
                            if let Some(i) = find(&buf, b"\r\n") {
                                break i;
                            }
                            if buf.len() > 64 * 1024 || !read_more(&mut s, &mut buf).await? {
                                return Ok(());
                            }
                        };
                        let t: Vec<u8> = buf.drain(..e + 2).collect();
                        if e == 0 {
                            break;
                        }
                        let name = t.split(|&b| b == b':').next().unwrap_or(b"");
                        let name = String::from_utf8_lossy(name).trim().to_ascii_lowercase();
                        if FRAMING.contains(&name.as_str())
                            || name == "authorization"
                            || name == "x-api-key"
                            || name.starts_with("x-keygate-")
                            || name == "host"
                        {
                            rec.seen.lock().unwrap()[idx]
                                .problems
                                .push(format!("trailer field {name} forwarded"));
                        }
                    }
                    break;
                }
                while buf.len() < size + 2 {
                    if !read_more(&mut s, &mut buf).await? {
                        return Ok(());
                    }
                }
                if &buf[size..size + 2] != b"\r\n" {
                    rec.seen.lock().unwrap()[idx]
                        .problems
                        .push("chunk data not followed by CRLF".into());
                    return Ok(());
                }
                buf.drain(..size + 2);
            }
        } else if let Some(cl) = get("content-length") {
            let n: usize = std::str::from_utf8(&cl)
                .ok()
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            while buf.len() < n {
                if !read_more(&mut s, &mut buf).await? {
                    return Ok(());
                }
            }
            buf.drain(..n);
        }
        if !early {
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await?;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Raw client.

/// What came back on one connection.
#[derive(Debug, Default, Clone)]
pub struct Exchange {
    /// Status codes of every response head read (1xx included), in order.
    pub statuses: Vec<u16>,
    /// The server closed the connection (EOF or reset) before we stopped reading.
    pub closed: bool,
}

impl Exchange {
    pub fn finals(&self) -> Vec<u16> {
        self.statuses
            .iter()
            .copied()
            .filter(|&s| s >= 200)
            .collect()
    }
}

/// Status codes of the response heads in `raw` (bodies skipped by Content-Length or chunked).
pub fn parse_statuses(raw: &[u8]) -> Vec<u16> {
    let mut out = Vec::new();
    let mut rest = raw;
    loop {
        let mut hs = [httparse::EMPTY_HEADER; 64];
        let mut res = httparse::Response::new(&mut hs);
        let Ok(httparse::Status::Complete(n)) = res.parse(rest) else {
            return out;
        };
        let code = res.code.unwrap_or(0);
        out.push(code);
        let cl = res
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .and_then(|h| {
                std::str::from_utf8(h.value)
                    .ok()?
                    .trim()
                    .parse::<usize>()
                    .ok()
            });
        let chunked = res.headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case("transfer-encoding")
                && h.value.eq_ignore_ascii_case(b"chunked")
        });
        rest = &rest[n..];
        if code < 200 || code == 204 || code == 304 {
            continue;
        }
        if let Some(cl) = cl {
            if rest.len() < cl {
                return out;
            }
            rest = &rest[cl..];
        } else if chunked {
            // Skip chunks.
            loop {
                let Some(e) = find(rest, b"\r\n") else {
                    return out;
                };
                let size = std::str::from_utf8(&rest[..e])
                    .ok()
                    .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok());
                let Some(size) = size else { return out };
                rest = &rest[e + 2..];
                if size == 0 {
                    let Some(t) = find(rest, b"\r\n") else {
                        return out;
                    };
                    rest = &rest[t + 2..];
                    break;
                }
                if rest.len() < size + 2 {
                    return out;
                }
                rest = &rest[size + 2..];
            }
        } else {
            // Read to close: nothing after it.
            return out;
        }
    }
}

/// Connects, writes `parts` (with `gap` between them), then reads until the server closes,
/// `idle` passes without a byte, or `cap` is over.
pub async fn exchange(
    addr: SocketAddr,
    parts: &[&[u8]],
    gap: Duration,
    idle: Duration,
    cap: Duration,
) -> Exchange {
    let start = Instant::now();
    let Ok(Ok(mut s)) = tokio::time::timeout(cap, TcpStream::connect(addr)).await else {
        return Exchange {
            closed: true,
            ..Default::default()
        };
    };
    let (mut r, mut w) = s.split();
    let mut raw = Vec::new();
    let mut closed = false;
    let write = async {
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(gap).await;
            }
            if w.write_all(p).await.is_err() {
                break;
            }
        }
        // Keep the write side open: a half-close would stop the server from reading
        // pipelined requests.
        std::future::pending::<()>().await;
    };
    let read = async {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let left = cap.saturating_sub(start.elapsed());
            if left.is_zero() {
                break;
            }
            match tokio::time::timeout(idle.min(left), r.read(&mut chunk)).await {
                Err(_) => break,
                Ok(Ok(0)) | Ok(Err(_)) => {
                    closed = true;
                    break;
                }
                Ok(Ok(n)) => raw.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::select! {
        () = write => {}
        () = read => {}
    }
    Exchange {
        statuses: parse_statuses(&raw),
        closed,
    }
}

// ---------------------------------------------------------------------------------------------
// Figures.

/// Where each hostile test writes its figures (printed by scripts/test.sh).
pub fn report_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("hostile");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Prints the figures and writes them to `report_dir()/name.txt`.
pub fn report(name: &str, text: &str) {
    println!("== {name}\n{text}");
    std::fs::write(report_dir().join(format!("{name}.txt")), text).unwrap();
}

/// Percentile of sorted durations, in milliseconds.
pub fn pct_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}
