//! An open-loop load: requests sent at a fixed rate whatever the answers, each timed from the
//! moment it was due (not from when a connection was free to send it), so a server that holds
//! requests back shows it in the latency instead of in a lower rate (wrk waits for each answer
//! before it sends the next on that connection).
//!
//!     cargo run --release --example open_loop -- ADDR RATE CONNECTIONS SECONDS [HEADER]...
//!     cargo run --release --example open_loop -- 127.0.0.1:8080 5000 64 10 "X-API-Key: kg_…"
//!
//! Plain HTTP/1.1 keep-alive `GET /` on CONNECTIONS connections, one request in flight on
//! each; a request due while every connection is busy waits for the first free one (its wait
//! counts). The first second is not counted. Prints the rate reached and the latency
//! percentiles in µs. Waits for events with `epoll_pwait2` timeouts to the nanosecond, and
//! sets its own timer slack to 1 µs, so it sends on time to within its wakeup. Stops with an
//! error on an answer that is not a 200 or not framed by `Content-Length`, on requests still
//! unanswered 10 s after the run, and on a run in which no counted request was due.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::num::NonZeroU64;
use std::time::{Duration, Instant};

use rustix::event::{Timespec, epoll};

/// How long after the end of the run the requests still in flight may take before the run
/// stops with an error (a server that stopped answering would otherwise hold it forever).
const ANSWER_GRACE: Duration = Duration::from_secs(10);

struct Conn {
    stream: TcpStream,
    /// When the request in flight was due (none: the connection is free).
    due: Option<Instant>,
    buf: Vec<u8>,
}

#[path = "support/response.rs"]
mod response;
use response::response_len;

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        eprintln!("usage: open_loop ADDR RATE CONNECTIONS SECONDS [HEADER]...");
        std::process::exit(2);
    }
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_string());
    let addr = &args[0];
    let rate: f64 = args[1].parse().map_err(|_| bad("RATE"))?;
    let conns: usize = args[2].parse().map_err(|_| bad("CONNECTIONS"))?;
    let secs: u64 = args[3].parse().map_err(|_| bad("SECONDS"))?;
    if secs < 2 || rate <= 0.0 || conns == 0 {
        return Err(bad(
            "SECONDS must be 2 or more (the first is not counted), RATE and CONNECTIONS above 0",
        ));
    }
    let mut request = format!("GET / HTTP/1.1\r\nHost: {addr}\r\n");
    for h in &args[4..] {
        request.push_str(h);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    let request = request.into_bytes();

    rustix::thread::set_current_timer_slack(NonZeroU64::new(1_000))?;
    let ep = epoll::create(epoll::CreateFlags::CLOEXEC)?;
    let mut cs = Vec::with_capacity(conns);
    for i in 0..conns {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_nonblocking(true)?;
        epoll::add(
            &ep,
            &stream,
            epoll::EventData::new_u64(i as u64),
            epoll::EventFlags::IN,
        )?;
        cs.push(Conn {
            stream,
            due: None,
            buf: Vec::with_capacity(4096),
        });
    }

    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    let count_from = start + Duration::from_secs(1);
    let end = start + Duration::from_secs(secs);
    let mut next = start;
    let mut waiting: VecDeque<Instant> = VecDeque::new();
    let mut free: Vec<usize> = (0..conns).collect();
    let mut lat: Vec<u32> = Vec::with_capacity((rate * secs as f64) as usize + 16);
    let mut sent = 0u64;
    let mut events: Vec<epoll::Event> = Vec::with_capacity(1024);
    let mut chunk = [0u8; 16384];
    let mut most_waiting = 0usize;

    loop {
        let now = Instant::now();
        while next <= now && next < end {
            waiting.push_back(next);
            next += interval;
        }
        most_waiting = most_waiting.max(waiting.len());
        while let (Some(&due), Some(&i)) = (waiting.front(), free.last()) {
            let c = &mut cs[i];
            c.stream.write_all(&request).map_err(|e| match e.kind() {
                // A request is far smaller than a socket's send buffer; a full one means the
                // server stopped reading from a connection with nothing in flight on it.
                io::ErrorKind::WouldBlock => io::Error::other(
                    "a connection's send buffer is full: the server is not reading",
                ),
                _ => e,
            })?;
            c.due = Some(due);
            waiting.pop_front();
            free.pop();
            sent += 1;
        }
        if next >= end && waiting.is_empty() && free.len() == conns {
            break;
        }
        if now >= end + ANSWER_GRACE {
            return Err(io::Error::other(format!(
                "{} requests still unanswered {} s after the last was due",
                conns - free.len(),
                ANSWER_GRACE.as_secs()
            )));
        }
        let timeout = if next < end {
            next.saturating_duration_since(Instant::now())
        } else {
            Duration::from_millis(100)
        };
        let ts = Timespec {
            tv_sec: timeout.as_secs() as i64,
            tv_nsec: i64::from(timeout.subsec_nanos()),
        };
        events.clear();
        epoll::wait(&ep, rustix::buffer::spare_capacity(&mut events), Some(&ts))?;
        for ev in &events {
            let i = ev.data.u64() as usize;
            let c = &mut cs[i];
            loop {
                match c.stream.read(&mut chunk) {
                    Ok(0) => return Err(io::Error::other("the server closed a connection")),
                    Ok(n) => c.buf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            if let Some(n) = response_len(&c.buf)? {
                if !c.buf.starts_with(b"HTTP/1.1 200") {
                    return Err(io::Error::other(format!(
                        "not a 200: {}",
                        String::from_utf8_lossy(&c.buf[..c.buf.len().min(80)])
                    )));
                }
                c.buf.drain(..n);
                let done = Instant::now();
                if let Some(due) = c.due.take()
                    && due >= count_from
                {
                    let us = done.saturating_duration_since(due).as_micros();
                    lat.push(u32::try_from(us).unwrap_or(u32::MAX));
                }
                free.push(i);
            }
        }
    }
    let elapsed = Instant::now()
        .saturating_duration_since(start)
        .as_secs_f64();
    if lat.is_empty() {
        return Err(io::Error::other(
            "no request was due after the first second: raise RATE or SECONDS",
        ));
    }
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "rate {:.0}/s asked, {:.0}/s sent; counted {}; latency µs p50 {} p90 {} p99 {} p99.9 {} max {}; most requests waiting for a connection {}",
        rate,
        sent as f64 / elapsed,
        lat.len(),
        pct(0.50),
        pct(0.90),
        pct(0.99),
        pct(0.999),
        lat.last().copied().unwrap_or(0),
        most_waiting
    );
    Ok(())
}
