//! The HTTP/1.1 fast path on the wire: a raw client against the real gateway in-process, and a
//! scripted raw upstream whose answer is chosen by the request path, so every response framing,
//! interim answers, misbehaving upstreams, connection reuse, pipelining, the handover to hyper
//! in the middle of a connection and the body timeouts are seen byte for byte.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::scripted::{Raw, Script, Seen, find, pattern};
use crate::support::{Gateway, Upstream};

async fn setup(extra: &str) -> (Gateway, Script, String) {
    let script = Script::default();
    let up = script.start().await;
    let gw =
        Gateway::start_custom(Upstream::start().await, |_| format!("http://{up}"), extra).await;
    let (key, _) = gw.client("fast", "pro").await;
    (gw, script, key)
}

fn get(path: &str, key: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: gw.example\r\nX-API-Key: {key}\r\n\r\n").into_bytes()
}

/// The head of a POST whose body of `len` bytes follows.
fn post(path: &str, key: &str, len: usize) -> Vec<u8> {
    format!("POST {path} HTTP/1.1\r\nHost: g\r\nX-API-Key: {key}\r\nContent-Length: {len}\r\n\r\n")
        .into_bytes()
}

#[tokio::test]
async fn every_response_framing_is_relayed_on_one_kept_alive_connection() {
    let (gw, script, key) = setup("").await;
    let mut c = Raw::connect(gw.proxy).await;

    c.send(&get("/chunked", &key)).await;
    let a = c.read("GET").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body, b"hello world");
    assert_eq!(a.header("x-up").as_deref(), Some("1"));
    assert!(a.header("x-trailer").is_none() && a.header("content-length").is_none());
    assert!(a.header("ratelimit-limit").is_some());

    c.send(&get("/interim", &key)).await;
    let a = c.read("GET").await;
    assert_eq!((a.status, &a.body[..]), (200, &b"ok"[..]));

    c.send(format!("HEAD /head HTTP/1.1\r\nHost: g\r\nX-API-Key: {key}\r\n\r\n").as_bytes())
        .await;
    let a = c.read("HEAD").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("content-length").as_deref(), Some("100"));

    c.send(&get("/notmod", &key)).await;
    let a = c.read("GET").await;
    assert_eq!(a.status, 304);
    assert_eq!(a.header("etag").as_deref(), Some("\"v1\""));

    c.send(&get("/hop", &key)).await;
    let a = c.read("GET").await;
    assert_eq!(a.status, 200);
    for gone in ["x-secret", "keep-alive", "upgrade", "proxy-authenticate"] {
        assert!(a.header(gone).is_none(), "{gone} relayed:\n{}", a.head);
    }
    assert_eq!(a.header("x-kept").as_deref(), Some("1"));
    assert_eq!(a.header("ratelimit-limit").as_deref(), Some("1000"));
    assert_eq!(a.head.matches("atelimit-limit").count(), 1);
    assert!(a.header("date").is_some());

    c.send(&get("/drip", &key)).await;
    let a = c.read("GET").await;
    assert_eq!(a.body, b"helloworld");

    c.send(&get("/big", &key)).await;
    let a = c.read("GET").await;
    assert_eq!(a.body, pattern(1 << 20));

    // A body delimited by the upstream's close is re-chunked; the client connection stays.
    c.send(&get("/eof", &key)).await;
    let a = c.read("GET").await;
    assert_eq!(a.header("transfer-encoding").as_deref(), Some("chunked"));
    assert_eq!(a.body, b"until the end");

    c.send(&get("/ok", &key)).await;
    assert_eq!(c.read("GET").await.body, b"ok");

    // One upstream connection carries one exchange after another, except after a bodiless
    // answer (HEAD, 304: a body an upstream wrongly sends there must not become the next
    // answer) and after a body delimited by closing.
    let seen = script.seen();
    let conns: Vec<usize> = seen.iter().map(|s| s.conn).collect();
    assert_eq!(seen.len(), 9, "{conns:?}");
    let same = |a: usize, b: usize| conns[a] == conns[b];
    // chunked, interim, HEAD | 304 | hop, drip, big, eof | ok
    assert!(same(0, 1) && same(1, 2), "{conns:?}");
    assert!(!same(2, 3) && !same(3, 4), "{conns:?}");
    assert!(same(4, 5) && same(5, 6) && same(6, 7), "{conns:?}");
    assert!(!same(7, 8), "{conns:?}");
}

#[tokio::test]
async fn uploads_stream_whole_and_pipelined_requests_are_answered_in_order() {
    let (gw, script, key) = setup("").await;
    let mut c = Raw::connect(gw.proxy).await;
    // 1 MiB in 64 KiB pieces, sent while the gateway is already forwarding.
    let body = pattern(1 << 20);
    c.send(&post("/echo", &key, body.len())).await;
    for piece in body.chunks(64 * 1024) {
        c.send(piece).await;
    }
    let a = c.read("POST").await;
    assert_eq!(a.status, 200);
    assert!(a.body == body, "echoed body differs");

    // Three requests in one write, one with a small body.
    let mut three = get("/ok?n=1", &key);
    three.extend(
        format!(
            "POST /echo?n=2 HTTP/1.1\r\nHost: g\r\nX-API-Key: {key}\r\nContent-Length: 5\r\n\r\nabcde"
        )
        .into_bytes(),
    );
    three.extend(get("/ok?n=3", &key));
    c.send(&three).await;
    assert_eq!(c.read("GET").await.body, b"ok");
    assert_eq!(c.read("POST").await.body, b"abcde");
    assert_eq!(c.read("GET").await.body, b"ok");
    let targets: Vec<String> = script
        .seen()
        .iter()
        .map(|s| s.head.split(' ').nth(1).unwrap().to_owned())
        .collect();
    assert_eq!(targets, ["/echo", "/ok?n=1", "/echo?n=2", "/ok?n=3"]);
    let up = script.seen();
    assert_eq!(up[0].body.len(), 1 << 20);
    assert_eq!(up[0].header("content-length").as_deref(), Some("1048576"));
    assert!(up[0].header("x-api-key").is_none());
    assert_eq!(up[0].header("x-keygate-client-id").as_deref(), Some("fast"));
}

#[tokio::test]
async fn a_chunked_upload_mid_connection_is_served_by_hyper_then_the_connection_closes() {
    let (gw, script, key) = setup("").await;
    let mut c = Raw::connect(gw.proxy).await;
    c.send(&get("/ok?first", &key)).await;
    assert_eq!(c.read("GET").await.status, 200);
    c.send(
        format!(
            "POST /echo HTTP/1.1\r\nHost: g\r\nX-API-Key: {key}\r\nTransfer-Encoding: chunked\r\n\r\n\
             3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    let a = c.read("POST").await;
    assert_eq!((a.status, &a.body[..]), (200, &b"abcde"[..]));
    // Hyper answers the one request it was handed and closes: every request head is read by
    // the fast path's parser first.
    assert_eq!(a.header("connection").as_deref(), Some("close"));
    assert!(c.closes(Duration::from_secs(3)).await);
    // A new connection is the fast path's again.
    let mut c = Raw::connect(gw.proxy).await;
    c.send(&get("/chunked?after", &key)).await;
    assert_eq!(c.read("GET").await.body, b"hello world");
    let seen = script.seen();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[1].body, b"abcde");
    assert!(seen[1].header("x-api-key").is_none());
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_refused_and_closes() {
    let (gw, script, key) = setup("").await;
    // However the rest of the head would be read (an unusual method that hyper would take,
    // the fields in either order), the request is answered 400 and nothing reaches the upstream.
    for head in [
        "POST /echo HTTP/1.1\r\nHost: g\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        "POST /echo HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        "PURGE /echo HTTP/1.1\r\nHost: g\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n",
        "POST /echo HTTP/1.0\r\nHost: g\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n",
    ] {
        let mut c = Raw::connect(gw.proxy).await;
        c.send(
            format!("{head}X-API-Key: {key}\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n")
                .as_bytes(),
        )
        .await;
        let a = c.read("POST").await;
        assert_eq!(a.status, 400, "{head:?}");
        assert!(String::from_utf8_lossy(&a.body).contains("bad_request"));
        assert!(c.closes(Duration::from_secs(3)).await, "{head:?}");
    }
    assert!(script.seen().is_empty(), "{:?}", script.seen());
}
/// RFC 9112 §3.2: an HTTP/1.1 request without `Host`, or any request with two, is answered 400
/// by both HTTP/1.1 engines and nothing reaches the upstream (two were forwarded, the engines
/// passing on different ones as `X-Forwarded-Host`); an HTTP/1.0 request may leave it out.
#[tokio::test]
async fn a_request_without_a_host_or_with_two_is_refused() {
    let (gw, script, key) = setup("").await;
    for (what, head) in [
        ("no host", "GET /ok HTTP/1.1\r\n".to_owned()),
        (
            "two hosts",
            "GET /ok HTTP/1.1\r\nHost: api.example\r\nHost: evil.example\r\n".to_owned(),
        ),
        (
            "no host, hyper's engine",
            "GET /ok HTTP/1.1\r\nTransfer-Encoding: chunked\r\n".to_owned(),
        ),
        (
            "two hosts, hyper's engine",
            "GET /ok HTTP/1.1\r\nHost: a\r\nhost: b\r\nTransfer-Encoding: chunked\r\n".to_owned(),
        ),
        (
            "two hosts, HTTP/1.0",
            "GET /ok HTTP/1.0\r\nHost: a\r\nHost: b\r\n".to_owned(),
        ),
    ] {
        let mut c = Raw::connect(gw.proxy).await;
        let body = if head.contains("chunked") {
            "0\r\n\r\n"
        } else {
            ""
        };
        c.send(format!("{head}X-API-Key: {key}\r\n\r\n{body}").as_bytes())
            .await;
        let a = c.read("GET").await;
        assert_eq!(a.status, 400, "{what}: {}", a.head);
        assert!(
            String::from_utf8_lossy(&a.body).contains("Host field"),
            "{what}: {}",
            String::from_utf8_lossy(&a.body)
        );
    }
    assert!(script.seen().is_empty(), "{:?}", script.seen());
    let mut c = Raw::connect(gw.proxy).await;
    c.send(format!("GET /ok HTTP/1.0\r\nX-API-Key: {key}\r\n\r\n").as_bytes())
        .await;
    assert_eq!(c.read("GET").await.status, 200);
}

#[tokio::test]
async fn misbehaving_upstreams_get_502_and_their_connections_are_not_reused() {
    let (gw, script, key) = setup("").await;
    let mut c = Raw::connect(gw.proxy).await;
    for path in [
        "/switch",
        "/conflict",
        "/garbage",
        "/gzipped",
        "/status",
        "/nothing",
    ] {
        c.send(&get(path, &key)).await;
        let a = c.read("GET").await;
        assert_eq!(a.status, 502, "{path}");
        assert!(String::from_utf8_lossy(&a.body).contains("upstream_unavailable"));
        // The client's connection survives the upstream's failure.
        c.send(&get("/ok", &key)).await;
        assert_eq!(c.read("GET").await.body, b"ok", "after {path}");
    }
    let seen = script.seen();
    let path = |s: &Seen| s.head.split(' ').nth(1).unwrap().to_owned();
    let paths: Vec<String> = seen.iter().map(path).collect();
    // `/nothing` on a reused connection is sent once more on a fresh one (nothing was answered
    // and GET is idempotent); every other request went upstream once.
    assert_eq!(
        paths,
        [
            "/switch",
            "/ok",
            "/conflict",
            "/ok",
            "/garbage",
            "/ok",
            "/gzipped",
            "/ok",
            "/status",
            "/ok",
            "/nothing",
            "/nothing",
            "/ok"
        ]
    );
    // Each failed exchange's connection was dropped: the request after it came on a new one.
    for pair in seen.windows(2).filter(|p| path(&p[0]) != "/ok") {
        assert_ne!(pair[0].conn, pair[1].conn, "{:?}", pair[1].head);
    }
}

#[tokio::test]
async fn connections_the_upstream_drops_between_requests_are_replaced_unseen() {
    let (gw, script, key) = setup("").await;
    let mut c = Raw::connect(gw.proxy).await;
    // The upstream answers, then closes without saying so: the next request must not fail,
    // whether the gateway notices the close before or only after sending on that connection.
    for i in 0..30 {
        c.send(&get(&format!("/bye?{i}"), &key)).await;
        let a = c.read("GET").await;
        assert_eq!((a.status, &a.body[..]), (200, &b"ok"[..]), "request {i}");
        if i % 3 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let conns: std::collections::HashSet<usize> = script.seen().iter().map(|s| s.conn).collect();
    assert!(conns.len() >= 30, "{} upstream connections", conns.len());
}

#[tokio::test]
async fn gateway_answers_keep_the_connection_unless_a_body_is_left_unread() {
    let (gw, script, key) = setup("").await;
    let mut c = Raw::connect(gw.proxy).await;
    c.send(b"GET /ok HTTP/1.1\r\nHost: g\r\n\r\n").await;
    let a = c.read("GET").await;
    assert_eq!(a.status, 401);
    assert!(a.header("www-authenticate").is_some());
    assert!(a.header("connection").is_none());
    // A refused request whose body arrived whole: the body is skipped, the connection stays.
    c.send(b"POST /ok HTTP/1.1\r\nHost: g\r\nX-API-Key: kg_nope\r\nContent-Length: 4\r\n\r\nbody")
        .await;
    assert_eq!(c.read("POST").await.status, 401);
    c.send(&get("/_keygate/health", "x")).await;
    assert_eq!(c.read("GET").await.body, b"{\"status\":\"ok\"}");
    c.send(&get("/ok", &key)).await;
    assert_eq!(c.read("GET").await.status, 200);
    // A refused request with most of its body still to come ends the connection.
    c.send(b"POST /ok HTTP/1.1\r\nHost: g\r\nContent-Length: 100000\r\n\r\nabc")
        .await;
    let a = c.read("POST").await;
    assert_eq!(a.status, 401);
    assert_eq!(a.header("connection").as_deref(), Some("close"));
    assert!(c.closes(Duration::from_secs(3)).await);
    assert_eq!(script.seen().len(), 1);
}

/// What a client that keeps writing after the gateway ended the connection sees once the
/// answer and the end of the stream are read: `true` when its bytes were answered with a reset
/// (the gateway's socket is closed), `false` when they were read and dropped (it lingers).
async fn reset_after_close(c: &mut crate::scripted::Raw) -> bool {
    assert!(
        c.closes(Duration::from_secs(3)).await,
        "the gateway ends the connection"
    );
    for _ in 0..20 {
        if c.s.write_all(b"more").await.is_err() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut one = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_millis(20), c.s.read(&mut one)).await;
        if let Ok(Err(e)) = read {
            return e.kind() == std::io::ErrorKind::ConnectionReset;
        }
    }
    false
}

/// A drain closes every connection that waits for its next request at once: one that has
/// served requests (its wait for the drain registered at its first idle wait and kept) as
/// well as one that has sent nothing yet; the listener then stops without waiting out its
/// grace period (60 s here, while `stop` allows 10).
#[tokio::test]
async fn a_drain_closes_idle_connections_at_once_however_many_requests_they_served() {
    let (gw, _script, key) = setup("[server]\nshutdown_grace_secs = 60").await;
    let mut served = Raw::connect(gw.proxy).await;
    for _ in 0..3 {
        served.send(&get("/ok", &key)).await;
        let a = served.read("GET").await;
        assert_eq!((a.status, &a.body[..]), (200, &b"ok"[..]));
        // The next head is not there yet: the connection waits, idle.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut fresh = Raw::connect(gw.proxy).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopping = tokio::spawn(gw.stop());
    assert!(
        served.closes(Duration::from_secs(5)).await,
        "a connection idle after its requests outlived the drain"
    );
    assert!(
        fresh.closes(Duration::from_secs(5)).await,
        "a connection idle from its start outlived the drain"
    );
    stopping.await.unwrap();
}

#[tokio::test]
async fn a_close_the_client_asked_for_is_immediate_and_unread_input_still_lingers() {
    let (gw, _script, key) = setup("").await;
    // Connection: close, the request read whole: the socket is closed right after the answer
    // (no wakeup for the client's last bytes, a TLS close_notify: they get a reset).
    let mut c = Raw::connect(gw.proxy).await;
    c.send(
        format!("GET /ok HTTP/1.1\r\nHost: g\r\nX-API-Key: {key}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await;
    let a = c.read("GET").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("connection").as_deref(), Some("close"));
    assert!(reset_after_close(&mut c).await, "closed at once");
    // A refused Connection: close request whose body arrived whole: the same.
    let mut c = Raw::connect(gw.proxy).await;
    c.send(b"POST /ok HTTP/1.1\r\nHost: g\r\nConnection: close\r\nContent-Length: 4\r\n\r\nbody")
        .await;
    assert_eq!(c.read("POST").await.status, 401);
    assert!(reset_after_close(&mut c).await, "closed at once");
    // The body still to come: the gateway reads and drops what follows for a moment, so the
    // answer is not lost to a reset.
    let mut c = Raw::connect(gw.proxy).await;
    c.send(
        b"POST /ok HTTP/1.1\r\nHost: g\r\nConnection: close\r\nContent-Length: 100000\r\n\r\nabc",
    )
    .await;
    assert_eq!(c.read("POST").await.status, 401);
    assert!(!reset_after_close(&mut c).await, "lingers");
    // Another request sent behind the one asking to close: lingers too.
    let mut c = Raw::connect(gw.proxy).await;
    let mut two =
        format!("GET /ok HTTP/1.1\r\nHost: g\r\nX-API-Key: {key}\r\nConnection: close\r\n\r\n")
            .into_bytes();
    two.extend_from_slice(&get("/ok", &key));
    c.send(&two).await;
    assert_eq!(c.read("GET").await.status, 200);
    assert!(!reset_after_close(&mut c).await, "lingers");
}

#[tokio::test]
async fn a_stalled_body_is_answered_408_and_an_early_answer_ends_the_connection() {
    let (gw, script, key) = setup("[limits]\nbody_timeout_secs = 1\n").await;
    let mut c = Raw::connect(gw.proxy).await;
    let started = Instant::now();
    c.send(
        format!("POST /ok HTTP/1.1\r\nHost: g\r\nX-API-Key: {key}\r\nContent-Length: 100\r\n\r\n0123456789")
            .as_bytes(),
    )
    .await;
    let a = c.read("POST").await;
    let took = started.elapsed();
    assert_eq!(a.status, 408);
    assert!(String::from_utf8_lossy(&a.body).contains("request_timeout"));
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(c.closes(Duration::from_secs(3)).await);

    // The upstream answers before the body is complete (it reads only the head): the answer is
    // relayed and the connection ends instead of waiting for the rest of the body.
    let up = early_upstream().await;
    let gw2 = Gateway::start_custom(Upstream::start().await, |_| format!("http://{up}"), "").await;
    let (key2, _) = gw2.client("early", "pro").await;
    let mut c = Raw::connect(gw2.proxy).await;
    c.send(
        format!(
            "POST /x HTTP/1.1\r\nHost: g\r\nX-API-Key: {key2}\r\nContent-Length: 1000000\r\n\r\nabc"
        )
        .as_bytes(),
    )
    .await;
    let a = c.read("POST").await;
    assert_eq!((a.status, &a.body[..]), (413, &b"no"[..]));
    assert_eq!(a.header("connection").as_deref(), Some("close"));
    assert!(c.closes(Duration::from_secs(3)).await);
    // The stalled request of the first part never reached its end upstream.
    assert!(script.seen().is_empty());
}

/// An upstream that answers 413 as soon as it has a request head, without reading the body.
async fn early_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while find(&buf, b"\r\n\r\n").is_none() {
                    match s.read(&mut chunk).await {
                        Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                        _ => return,
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 2\r\n\r\nno")
                    .await;
                tokio::time::sleep(Duration::from_secs(5)).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_interim_answer_during_an_upload_does_not_cut_it_short() {
    let (gw, script, key) = setup("").await;
    let mut c = Raw::connect(gw.proxy).await;
    let body = pattern(200_000);
    c.send(&post("/continue", &key, body.len())).await;
    // The upstream says 100 Continue as soon as it has the head; the rest comes later.
    tokio::time::sleep(Duration::from_millis(50)).await;
    for piece in body.chunks(50_000) {
        c.send(piece).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let a = c.read("POST").await;
    assert_eq!(a.status, 200);
    assert!(
        a.body == body,
        "echoed body differs ({} bytes)",
        a.body.len()
    );
    assert!(a.header("connection").is_none());
    assert_eq!(script.seen()[0].body.len(), body.len());
}

#[tokio::test]
async fn a_head_over_the_limit_is_431_even_when_it_arrives_whole() {
    let (gw, script, key) = setup("[limits]\nmax_header_bytes = 16384\n").await;
    let mut c = Raw::connect(gw.proxy).await;
    // A request with a body first, so the connection's buffer has grown past the limit.
    let body = pattern(40_000);
    c.send(&post("/echo", &key, body.len())).await;
    c.send(&body).await;
    assert_eq!(c.read("POST").await.status, 200);
    let mut head = get("/ok", &key);
    let pad = format!("X-Pad: {}\r\n", "p".repeat(16_385 - head.len() - 9));
    let at = head.len() - 2;
    head.splice(at..at, pad.bytes());
    assert_eq!(head.len(), 16_385);
    c.send(&head).await;
    assert_eq!(c.read("GET").await.status, 431);
    assert_eq!(script.seen().len(), 1);
}
