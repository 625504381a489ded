//! Head limits (431), 1 000 slow clients while legitimate traffic is measured, and file
//! descriptor exhaustion of the real binary.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::harness::{self, Recorder};

fn get(path: &str, key: &str, extra: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n{extra}Connection: close\r\n\r\n"
    )
    .into_bytes()
}

async fn status_of(proxy: SocketAddr, parts: &[&[u8]], gap: Duration) -> Vec<u16> {
    harness::exchange(
        proxy,
        parts,
        gap,
        Duration::from_secs(3),
        Duration::from_secs(10),
    )
    .await
    .finals()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_over_the_limits_get_431() {
    let rec = Recorder::default();
    let up = harness::raw_upstream(&rec, "root").await;
    let dir = tempfile::tempdir().unwrap();
    let text = harness::config(
        &format!("http://{up}"),
        dir.path(),
        "[limits]\nmax_header_bytes = 16384\nmax_headers = 32\n",
    );
    let gw = harness::keygate(&text, dir.path()).spawn();
    let (key, _) = harness::make_key(gw.admin, "limits", &[]).await;
    let pad = |n: usize| format!("X-Pad: {}\r\n", "a".repeat(n));
    let fields = |n: usize| (0..n).map(|i| format!("X-H{i}: v\r\n")).collect::<String>();
    let mut lines = Vec::new();
    let mut check = |name: &str, got: Vec<u16>, want: u16| {
        lines.push(format!("{name}: {got:?}"));
        assert_eq!(got, vec![want], "{name}");
    };

    let p = gw.proxy;
    let z = Duration::ZERO;
    check(
        "15 KiB head",
        status_of(p, &[&get("/a", &key, &pad(15 * 1024))], z).await,
        200,
    );
    check(
        "17 KiB head",
        status_of(p, &[&get("/a", &key, &pad(17 * 1024))], z).await,
        431,
    );
    check(
        "1 MiB head",
        status_of(p, &[&get("/a", &key, &pad(1 << 20))], z).await,
        431,
    );
    // The head split across two reads with a pause (hyper#4081: the second read bypassed the
    // limit).
    let split = get("/a", &key, &pad(20 * 1024));
    check(
        "20 KiB head in two writes 200 ms apart",
        status_of(
            p,
            &[&split[..10 * 1024], &split[10 * 1024..]],
            Duration::from_millis(200),
        )
        .await,
        431,
    );
    check(
        "20 KiB bearer token",
        status_of(p, &[&get("/a", &"k".repeat(20 * 1024), "")], z).await,
        431,
    );
    // Host, Authorization and Connection plus n more.
    check(
        "32 fields",
        status_of(p, &[&get("/a", &key, &fields(29))], z).await,
        200,
    );
    check(
        "33 fields",
        status_of(p, &[&get("/a", &key, &fields(30))], z).await,
        431,
    );
    check(
        "1 000 fields",
        status_of(p, &[&get("/a", &key, &fields(1000))], z).await,
        431,
    );
    let mut gw = gw;
    assert!(gw.alive() && gw.panics().is_empty());
    harness::report(
        "head-limits",
        &format!(
            "limits: max_header_bytes 16384, max_headers 32\n{}\n",
            lines.join("\n")
        ),
    );
}

/// How a slow connection ended.
#[derive(Clone, Copy, Debug)]
enum End {
    /// Closed by the server after this long (from the first byte sent).
    Closed(Duration),
    /// Still open when the test stopped watching.
    Open,
}

/// Sends `head`, then `drip` every `every`, until the server closes or `cap` passes.
async fn slow_client(
    addr: SocketAddr,
    head: Vec<u8>,
    drip: &'static [u8],
    every: Duration,
    cap: Duration,
) -> End {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return End::Closed(Duration::ZERO);
    };
    let start = Instant::now();
    if s.write_all(&head).await.is_err() {
        return End::Closed(start.elapsed());
    }
    let (mut r, mut w) = s.split();
    let drip_loop = async {
        loop {
            tokio::time::sleep(every).await;
            if w.write_all(drip).await.is_err() {
                return;
            }
        }
    };
    let watch = async {
        let mut buf = [0u8; 4096];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::select! {
        () = watch => End::Closed(start.elapsed()),
        () = async { drip_loop.await; std::future::pending::<()>().await } => unreachable!(),
        () = tokio::time::sleep(cap) => End::Open,
    }
}

async fn legit(proxy: SocketAddr, key: &str) -> Option<Duration> {
    let start = Instant::now();
    let ex = harness::exchange(
        proxy,
        &[&get("/a", key, "")],
        Duration::ZERO,
        Duration::from_secs(2),
        Duration::from_secs(3),
    )
    .await;
    (ex.finals() == [200]).then(|| start.elapsed())
}

fn summary(name: &str, ends: &[End]) -> (String, Option<Duration>, usize) {
    let mut closed: Vec<Duration> = ends
        .iter()
        .filter_map(|e| match e {
            End::Closed(d) => Some(*d),
            End::Open => None,
        })
        .collect();
    closed.sort();
    let open = ends.len() - closed.len();
    let max = closed.last().copied();
    (
        format!(
            "{name}: {} connections, closed {} (p50 {:.0} ms, max {:.0} ms), still open at the end {open}",
            ends.len(),
            closed.len(),
            harness::pct_ms(&closed, 0.5),
            max.map_or(0.0, |d| d.as_secs_f64() * 1000.0),
        ),
        max,
        open,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_closed_while_legit_traffic_is_served() {
    harness::raise_nofile(8192);
    let rec = Recorder::default();
    let up = harness::raw_upstream(&rec, "root").await;
    let dir = tempfile::tempdir().unwrap();
    let text = harness::config(
        &format!("http://{up}"),
        dir.path(),
        "[limits]\nheader_read_timeout_secs = 2\n",
    );
    let mut gw = harness::keygate(&text, dir.path()).spawn();
    let (key, _) = harness::make_key(gw.admin, "slow", &[]).await;
    let key = Arc::new(key);
    let proxy = gw.proxy;

    // Baseline.
    let mut base = Vec::new();
    for _ in 0..100 {
        base.push(legit(proxy, &key).await.expect("baseline request"));
    }
    base.sort();

    // 1 000 slow clients: 800 partial heads (slowloris), 150 slow bodies without a key, and
    // 50 with a key: to an upstream that reads the whole body (20 with a length, 10 chunked)
    // and to one that answers at once (10 with a length, 10 chunked). Chunked uploads are
    // served by hyper, the rest by the fast path.
    let timeout = Duration::from_secs(2);
    let mut tasks = Vec::new();
    let every = Duration::from_millis(500);
    let with_key = |path: &str, framing: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n{framing}\r\n\r\n"
        )
        .into_bytes()
    };
    for i in 0..1000 {
        let (head, drip, group): (Vec<u8>, &'static [u8], usize) = match i % 100 {
            0..80 => (
                b"GET /a HTTP/1.1\r\nHost: gw\r\n".to_vec(),
                b"X-a: b\r\n",
                0,
            ),
            80..95 => (
                b"POST /a HTTP/1.1\r\nHost: gw\r\nContent-Length: 100000\r\n\r\n".to_vec(),
                b"x",
                1,
            ),
            95..97 => (with_key("/a", "Content-Length: 100000"), b"x", 2),
            97 => (
                with_key("/a", "Transfer-Encoding: chunked"),
                b"1\r\nx\r\n",
                3,
            ),
            98 => (with_key("/early/a", "Content-Length: 100000"), b"x", 4),
            _ => (
                with_key("/early/a", "Transfer-Encoding: chunked"),
                b"1\r\nx\r\n",
                5,
            ),
        };
        let cap = Duration::from_secs(15);
        tasks.push((
            group,
            tokio::spawn(slow_client(proxy, head, drip, every, cap)),
        ));
        if i % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Legitimate traffic during the attack: a request every 20 ms for 6 s.
    let mut during = Vec::new();
    let mut failed = 0;
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        let tick = Instant::now();
        match legit(proxy, &key).await {
            Some(d) => during.push(d),
            None => failed += 1,
        }
        tokio::time::sleep(Duration::from_millis(20).saturating_sub(tick.elapsed())).await;
    }
    during.sort();
    let mut groups: [Vec<End>; 6] = Default::default();
    for (g, t) in tasks {
        groups[g].push(t.await.unwrap());
    }
    let names = [
        "partial heads (slowloris)",
        "slow bodies, no key",
        "slow bodies with a length, key, upstream reads the body",
        "slow chunked bodies, key, upstream reads the body",
        "slow bodies with a length, key, upstream answers at once",
        "slow chunked bodies, key, upstream answers at once",
    ];
    let summaries: Vec<(String, Option<Duration>, usize)> = names
        .iter()
        .zip(&groups)
        .map(|(name, ends)| summary(name, ends))
        .collect();
    let total = during.len() + failed;
    let text = format!(
        "header_read_timeout 2 s, upstream_timeout 3 s, 1 000 slow connections\n\
         {}\n\
         legit requests during the attack: {total}, succeeded {} ({:.1} %), failed {failed}\n\
         legit latency baseline p50 {:.1} ms p99 {:.1} ms; during the attack p50 {:.1} ms p99 {:.1} ms\n",
        summaries
            .iter()
            .map(|s| s.0.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        during.len(),
        100.0 * during.len() as f64 / total.max(1) as f64,
        harness::pct_ms(&base, 0.5),
        harness::pct_ms(&base, 0.99),
        harness::pct_ms(&during, 0.5),
        harness::pct_ms(&during, 0.99),
    );
    harness::report("slow-clients", &text);
    assert!(gw.alive() && gw.panics().is_empty(), "keygate crashed");
    // Heads and refused bodies: the header read timeout (2 s) plus slack. Bodies the upstream
    // reads: the upstream timeout (3 s) plus slack. Bodies answered early: closed once the
    // answer is out.
    let bound = timeout + Duration::from_millis(1500);
    let bounds = [
        bound,
        bound,
        Duration::from_millis(4500),
        Duration::from_millis(4500),
        bound,
        bound,
    ];
    for ((name, max, open), limit) in summaries.iter().zip(bounds) {
        assert_eq!(*open, 0, "{name}: left open");
        assert!(max.unwrap() <= limit, "{name}: closed after {max:?}");
    }
    assert_eq!(failed, 0, "legit requests failed during the attack");
    assert!(total >= 100, "too few legit requests: {total}");
    assert!(
        harness::pct_ms(&during, 0.99) < 1000.0,
        "legit p99 over 1 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptor_exhaustion_is_survived_and_recovered() {
    let rec = Recorder::default();
    let up = harness::raw_upstream(&rec, "root").await;
    let dir = tempfile::tempdir().unwrap();
    let text = harness::config(
        &format!("http://{up}"),
        dir.path(),
        "[limits]\nheader_read_timeout_secs = 30\n",
    );
    let mut gw = harness::keygate(&text, dir.path()).nofile(64).spawn();
    let (key, _) = harness::make_key(gw.admin, "fds", &[]).await;
    assert!(
        legit(gw.proxy, &key).await.is_some(),
        "request before exhaustion"
    );

    // Far more connections than descriptors; they sit in the backlog once accept fails.
    let mut held = Vec::new();
    for _ in 0..150 {
        held.push(TcpStream::connect(gw.proxy).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let exhausted = gw.log_contains("accept failed");
    let cpu0 = gw.cpu_time();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu = (gw.cpu_time() - cpu0).as_secs_f64() / t0.elapsed().as_secs_f64();
    let alive_during = gw.alive();

    drop(held);
    let released = Instant::now();
    let mut recovered = None;
    while released.elapsed() < Duration::from_secs(5) {
        let ex = harness::exchange(
            gw.proxy,
            &[&get("/a", &key, "")],
            Duration::ZERO,
            Duration::from_millis(500),
            Duration::from_millis(500),
        )
        .await;
        if ex.finals() == [200] {
            recovered = Some(released.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = format!(
        "open-file limit 64, 150 connections held\n\
         accept hit EMFILE: {exhausted}\n\
         alive while exhausted: {alive_during}\n\
         CPU while exhausted: {:.1} % of one core\n\
         first successful request after release: {}\n",
        cpu * 100.0,
        recovered.map_or("none within 5 s".into(), |d| format!(
            "{:.0} ms",
            d.as_secs_f64() * 1000.0
        )),
    );
    harness::report("fd-exhaustion", &text);
    assert!(exhausted, "the test never exhausted the descriptors");
    assert!(alive_during && gw.alive(), "keygate exited");
    assert!(cpu < 0.20, "keygate spins at EMFILE: {:.0} %", cpu * 100.0);
    let recovered = recovered.expect("no recovery within 5 s");
    assert!(
        recovered <= Duration::from_secs(1),
        "recovery took {recovered:?}"
    );
    assert!(gw.panics().is_empty());
}
