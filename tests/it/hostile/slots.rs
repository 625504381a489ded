//! Connection slots: a client that sends an admin request head and never its body must not
//! hold a slot for longer than `limits.body_timeout_secs`, and one address must not take more
//! than `limits.max_connections_per_ip` connections of a listener.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use super::harness;

/// Connects to `to` from the loopback address `from` (any of 127.0.0.0/8 works on Linux), so
/// one test can act as several client addresses.
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(from.parse::<IpAddr>().unwrap(), 0))
        .unwrap();
    socket.connect(to).await.unwrap()
}

/// Reads until the server closes the connection or `cap` passes: what was read, and when the
/// connection closed (`None`: still open at `cap`).
async fn read_to_close(s: &mut TcpStream, cap: Duration) -> (Vec<u8>, Option<Duration>) {
    let start = Instant::now();
    let mut raw = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let left = cap.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Err(_) => return (raw, None),
            Ok(Ok(0)) | Ok(Err(_)) => return (raw, Some(start.elapsed())),
            Ok(Ok(n)) => raw.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Sends `request` on `s` and reads until one whole answer is in (or `cap` passes, or the
/// connection closes): its status, `None` when nothing came back.
async fn ask(s: &mut TcpStream, request: &[u8], cap: Duration) -> Option<u16> {
    if s.write_all(request).await.is_err() {
        return None;
    }
    let start = Instant::now();
    let mut raw = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(&status) = harness::parse_statuses(&raw).first()
            && whole_answer(&raw)
        {
            return Some(status);
        }
        let left = cap.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => raw.extend_from_slice(&chunk[..n]),
            _ => return harness::parse_statuses(&raw).first().copied(),
        }
    }
}

/// True when `raw` holds a response head and all of its `Content-Length` body.
fn whole_answer(raw: &[u8]) -> bool {
    let mut hs = [httparse::EMPTY_HEADER; 64];
    let mut res = httparse::Response::new(&mut hs);
    let Ok(httparse::Status::Complete(n)) = res.parse(raw) else {
        return false;
    };
    let len = res
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| {
            std::str::from_utf8(h.value)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        })
        .unwrap_or(0);
    raw.len() >= n + len
}

fn login_head(length: usize) -> Vec<u8> {
    format!(
        "POST /auth/login HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {length}\r\n\r\n"
    )
    .into_bytes()
}

/// Logs in with `key` on a new connection: the status and the time the answer took.
async fn login(admin: SocketAddr, key: &str, cap: Duration) -> (Option<u16>, Duration) {
    let body = serde_json::json!({ "api_key": key }).to_string();
    let mut req = login_head(body.len());
    req.extend_from_slice(body.as_bytes());
    let start = Instant::now();
    let Ok(Ok(mut s)) = tokio::time::timeout(cap, TcpStream::connect(admin)).await else {
        return (None, start.elapsed());
    };
    let status = ask(&mut s, &req, cap.saturating_sub(start.elapsed())).await;
    (status, start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_admin_bodies_are_answered_408_and_free_their_slots() {
    let rec = harness::Recorder::default();
    let up = harness::raw_upstream(&rec, "root").await;
    let dir = tempfile::tempdir().unwrap();
    let body_timeout = Duration::from_secs(2);
    let text = harness::config(
        &format!("http://{up}"),
        dir.path(),
        // No cap per address: the body timeout alone must free the slots.
        "[limits]\nmax_connections = 5\nbody_timeout_secs = 2\nmax_connections_per_ip = 0\n",
    );
    let mut gw = harness::keygate(&text, dir.path()).spawn();
    let (key, _) = harness::make_key(gw.admin, "stall", &[]).await;
    let (status, _) = login(gw.admin, &key, Duration::from_secs(5)).await;
    assert_eq!(status, Some(200), "login before the attack");

    // Every admin slot taken: five login heads whose bodies never come, each from an address
    // of its own (so no per-address cap is what frees them).
    let stalled_at = Instant::now();
    let mut stalled = Vec::new();
    for i in 0..5 {
        let mut s = connect_from(&format!("127.0.0.{}", 11 + i), gw.admin).await;
        s.write_all(&login_head(100)).await.unwrap();
        s.write_all(b"{\"api_key\": \"kg_").await.unwrap();
        stalled.push(tokio::spawn(async move {
            read_to_close(&mut s, Duration::from_secs(10)).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A valid login waits for a slot (in the backlog); the proxy, whose slots are its own,
    // serves a valid key throughout.
    let admin = gw.admin;
    let waiting_key = key.clone();
    let legit_login =
        tokio::spawn(async move { login(admin, &waiting_key, Duration::from_secs(10)).await });
    let mut proxied = 0;
    let mut proxy_failures = 0;
    while !legit_login.is_finished() && stalled_at.elapsed() < Duration::from_secs(12) {
        let request = format!(
            "GET /a HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
        );
        let ex = harness::exchange(
            gw.proxy,
            &[request.as_bytes()],
            Duration::ZERO,
            Duration::from_secs(2),
            Duration::from_secs(3),
        )
        .await;
        if ex.finals() == [200] {
            proxied += 1;
        } else {
            proxy_failures += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (login_status, login_waited) = legit_login.await.unwrap();

    let mut freed = Vec::new();
    let mut answers_408 = 0;
    for t in stalled {
        let (raw, closed) = t.await.unwrap();
        let text = String::from_utf8_lossy(&raw);
        if harness::parse_statuses(&raw) == [408] && text.contains("\"request_timeout\"") {
            answers_408 += 1;
        }
        freed.push(closed);
    }
    let closed: Vec<Duration> = freed.iter().flatten().copied().collect();
    let max_closed = closed.iter().max().copied();

    // Another JSON body read (an admin write) has the same bound.
    let mut s = TcpStream::connect(gw.admin).await.unwrap();
    s.write_all(
        format!(
            "POST /v1/api-keys HTTP/1.1\r\nHost: localhost\r\nX-Admin-Key: {}\r\n\
             Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{{\"name\":",
            harness::ADMIN_KEY
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let (raw, write_closed) = read_to_close(&mut s, Duration::from_secs(10)).await;
    let write_answer = harness::parse_statuses(&raw);

    let text = format!(
        "max_connections 5, body_timeout 2 s, 5 connections sending a login head and stalling\n\
         stalled connections answered 408 request_timeout: {answers_408}/5, closed {}/5, \
         last closed after {}\n\
         valid login queued behind them: {login_status:?} after {:.0} ms\n\
         valid key on the proxy meanwhile: {proxied} served, {proxy_failures} failed\n\
         stalled admin write (POST /v1/api-keys): {write_answer:?}, closed after {}\n",
        closed.len(),
        max_closed.map_or("never".into(), |d| format!(
            "{:.0} ms",
            d.as_secs_f64() * 1000.0
        )),
        login_waited.as_secs_f64() * 1000.0,
        write_closed.map_or("never".into(), |d| format!(
            "{:.0} ms",
            d.as_secs_f64() * 1000.0
        )),
    );
    harness::report("admin-stalled-bodies", &text);
    let bound = body_timeout + Duration::from_millis(1500);
    assert_eq!(answers_408, 5, "{text}");
    assert_eq!(closed.len(), 5, "stalled connections left open: {text}");
    assert!(max_closed.unwrap() <= bound, "{text}");
    assert_eq!(login_status, Some(200), "{text}");
    assert!(login_waited <= bound, "{text}");
    assert!(proxied >= 10 && proxy_failures == 0, "{text}");
    assert_eq!(write_answer, [408], "{text}");
    assert!(write_closed.is_some_and(|d| d <= bound), "{text}");
    assert!(gw.alive() && gw.panics().is_empty(), "keygate crashed");
}

fn keyed_get(key: &str) -> Vec<u8> {
    format!("GET /a HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n\r\n").into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_per_ip_cap_are_refused_on_both_listeners() {
    let rec = harness::Recorder::default();
    let up = harness::raw_upstream(&rec, "root").await;
    let dir = tempfile::tempdir().unwrap();
    let text = harness::config(
        &format!("http://{up}"),
        dir.path(),
        "[limits]\nmax_connections_per_ip = 2\n",
    );
    let mut gw = harness::keygate(&text, dir.path()).spawn();
    let (key, _) = harness::make_key(gw.admin, "per-ip", &[]).await;
    // How long an answer may take: a refused connection is closed at once, so a generous wait
    // (a busy machine running the whole suite) does not hide a refusal.
    let cap = Duration::from_secs(10);
    let mut report = String::from("max_connections_per_ip 2\n");
    for (listener, addr, request) in [
        ("proxy", gw.proxy, keyed_get(&key)),
        (
            "admin",
            gw.admin,
            b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(),
        ),
    ] {
        // Two connections from 127.0.0.1 are served, and stay open.
        let mut first = connect_from("127.0.0.1", addr).await;
        let mut second = connect_from("127.0.0.1", addr).await;
        assert_eq!(
            ask(&mut first, &request, cap).await,
            Some(200),
            "{listener}"
        );
        assert_eq!(
            ask(&mut second, &request, cap).await,
            Some(200),
            "{listener}"
        );

        // A third from the same address is closed at once, unanswered.
        let started = Instant::now();
        let mut third = connect_from("127.0.0.1", addr).await;
        let refused = ask(&mut third, &request, cap).await;
        let (_, closed) = read_to_close(&mut third, cap).await;
        let refused_in = started.elapsed();
        assert_eq!(refused, None, "{listener}: third connection answered");
        assert!(closed.is_some(), "{listener}: third connection left open");

        // The first two still work; another address is served.
        assert_eq!(
            ask(&mut first, &request, cap).await,
            Some(200),
            "{listener}"
        );
        assert_eq!(
            ask(&mut second, &request, cap).await,
            Some(200),
            "{listener}"
        );
        let mut other = connect_from("127.0.0.2", addr).await;
        assert_eq!(
            ask(&mut other, &request, cap).await,
            Some(200),
            "{listener}"
        );

        // Once one of the two closes, 127.0.0.1 may connect again.
        drop(first);
        let freed = Instant::now();
        let mut again = None;
        while freed.elapsed() < Duration::from_secs(5) {
            let mut s = connect_from("127.0.0.1", addr).await;
            if ask(&mut s, &request, Duration::from_secs(1)).await == Some(200) {
                again = Some(freed.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let again = again.unwrap_or_else(|| panic!("{listener}: slot never came back"));
        report.push_str(&format!(
            "{listener}: 2 connections from 127.0.0.1 served, the 3rd closed unanswered in {:.0} ms, \
             127.0.0.2 served, a new connection served {:.0} ms after one of the two closed\n",
            refused_in.as_secs_f64() * 1000.0,
            again.as_secs_f64() * 1000.0,
        ));
        drop(second);
    }
    // The server frees the slots of the connections just closed when it reads their end: until
    // then a third connection from 127.0.0.1 is still over the cap, so ask again for a moment.
    let asked = Instant::now();
    let (status, metrics) = loop {
        let (status, metrics) = metrics_text(gw.admin).await;
        if status == 200 || asked.elapsed() > Duration::from_secs(5) {
            break (status, metrics);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status, 200);
    for listener in ["proxy", "admin"] {
        let line = format!("keygate_connections_refused_total{{listener=\"{listener}\"}} ");
        let n: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .unwrap_or_else(|| panic!("no {line} in\n{metrics}"))
            .trim()
            .parse()
            .unwrap();
        assert!(n >= 1, "{line}{n}");
        report.push_str(&format!("{line}{n}\n"));
    }
    harness::report("per-ip-connections", &report);
    assert!(gw.alive() && gw.panics().is_empty(), "keygate crashed");
}

async fn metrics_text(admin: SocketAddr) -> (u16, String) {
    let mut s = TcpStream::connect(admin).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (raw, _) = read_to_close(&mut s, Duration::from_secs(5)).await;
    let status = harness::parse_statuses(&raw).first().copied().unwrap_or(0);
    let text = String::from_utf8_lossy(&raw);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, body.to_owned())
}
