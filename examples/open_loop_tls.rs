//! An open-loop load of new TLS connections: at a fixed rate, whatever the answers, a new
//! connection is opened (TCP, then a TLS 1.3 handshake, resumed when the client holds a ticket
//! from the server), one `GET /` with `Connection: close` is sent on it and its answer read; each
//! is timed from the moment it was due to the last byte of the answer. So the handshake is in the
//! latency (wrk's latency starts after it), and a server that is slow in any step shows it there
//! instead of in a lower rate.
//!
//!     cargo run --release --example open_loop_tls -- ADDR RATE SECONDS CERT_PEM [HEADER]...
//!     cargo run --release --example open_loop_tls -- 127.0.0.1:8443 1000 10 tls.crt "X-API-Key: kg_…"
//!
//! The server must present exactly the certificate in CERT_PEM (pinned: no CA chain is built; the
//! handshake's signature is checked against it). The client is rustls (ring, TLS 1.3 only, its
//! default key exchange groups and session cache); it uses each ticket once, as rustls does. The
//! first second is not counted. Prints the rate at which connections were started (below RATE
//! when the client fell behind), how many handshakes were resumed, and
//! the latency percentiles in µs in the form of `open_loop`. Requests are started by a pacing
//! thread that sleeps to the due time with a timer slack of 1 µs and hands each to a
//! single-threaded runtime; how late a connection started is printed too (`start lag`). Stops
//! with an error, after printing what it measured, when any connection failed (refused,
//! handshake, not a 200, not framed by `Content-Length`), or when answers are still missing 10 s
//! after the run.

use std::io;
use std::net::SocketAddr;
use std::num::NonZeroU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, HandshakeKind, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;

#[path = "support/response.rs"]
mod response;

/// How long after the end of the run the connections still open may take before the run stops
/// with an error.
const ANSWER_GRACE: Duration = Duration::from_secs(10);

/// Accepts the one certificate given and checks the handshake's signature against it.
#[derive(Debug)]
struct Pinned {
    cert: CertificateDer<'static>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.cert.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the server's certificate is not the one given".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// One connection's outcome: when it was due, how late it started, when its answer was whole,
/// whether its handshake was resumed.
struct Sample {
    due: Instant,
    started: Instant,
    done: Instant,
    resumed: bool,
}

async fn one(
    addr: SocketAddr,
    connector: TlsConnector,
    name: ServerName<'static>,
    request: Arc<[u8]>,
    due: Instant,
) -> Result<Sample, String> {
    let started = Instant::now();
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    tcp.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let resumed = tls.get_ref().1.handshake_kind() == Some(HandshakeKind::Resumed);
    tls.write_all(&request)
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let done = loop {
        let n = tls
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("the server closed the connection before the whole answer".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if response::response_len(&buf)
            .map_err(|e| e.to_string())?
            .is_some()
        {
            let done = Instant::now();
            if !buf.starts_with(b"HTTP/1.1 200") {
                let line = buf.split(|&b| b == b'\r').next().unwrap_or_default();
                return Err(format!("not a 200: {}", String::from_utf8_lossy(line)));
            }
            break done;
        }
    };
    // close_notify and the FIN, as wrk does; not timed.
    let _ = tls.shutdown().await;
    Ok(Sample {
        due,
        started,
        done,
        resumed,
    })
}

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        eprintln!("usage: open_loop_tls ADDR RATE SECONDS CERT_PEM [HEADER]...");
        std::process::exit(2);
    }
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_string());
    let addr: SocketAddr = args[0].parse().map_err(|_| bad("ADDR: ip:port"))?;
    let rate: f64 = args[1].parse().map_err(|_| bad("RATE"))?;
    let secs: u64 = args[2].parse().map_err(|_| bad("SECONDS"))?;
    if secs < 2 || !(rate > 0.0 && rate.is_finite()) {
        return Err(bad(
            "SECONDS must be 2 or more (the first is not counted), RATE above 0",
        ));
    }
    let cert = CertificateDer::from_pem_file(&args[3])
        .map_err(|e| bad(&format!("CERT_PEM {}: {e}", args[3])))?;
    let mut request = format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for h in &args[4..] {
        request.push_str(h);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    let request: Arc<[u8]> = request.into_bytes().into();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let algs = provider.signature_verification_algorithms;
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::clone(&provider) as Arc<CryptoProvider>)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(io::Error::other)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned { cert, algs }))
            .with_no_client_auth();
    let connector = TlsConnector::from(Arc::new(config));
    let name = ServerName::IpAddress(addr.ip().into());

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = rt.handle().clone();
    let (tx, mut rx) = mpsc::unbounded_channel::<Result<Sample, String>>();

    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now() + Duration::from_millis(50);
    let count_from = start + Duration::from_secs(1);
    let end = start + Duration::from_secs(secs);
    // The number of connections started, and when the last was.
    let pacer = std::thread::spawn(move || -> io::Result<(u64, Instant)> {
        rustix::thread::set_current_timer_slack(NonZeroU64::new(1_000))?;
        let mut next = start;
        let mut sent = 0u64;
        let mut last = start;
        while next < end {
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            }
            let tx = tx.clone();
            let (connector, name, request) =
                (connector.clone(), name.clone(), Arc::clone(&request));
            let due = next;
            last = Instant::now();
            handle.spawn(async move {
                let _ = tx.send(one(addr, connector, name, request, due).await);
            });
            sent += 1;
            next += interval;
        }
        Ok((sent, last))
    });

    let mut samples = Vec::with_capacity((rate * secs as f64) as usize + 16);
    let mut errors: Vec<String> = Vec::new();
    let mut error_count = 0u64;
    let timed_out = rt.block_on(async {
        let deadline = tokio::time::Instant::from_std(end + ANSWER_GRACE);
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Ok(s))) => samples.push(s),
                Ok(Some(Err(e))) => {
                    error_count += 1;
                    if errors.len() < 3 && !errors.contains(&e) {
                        errors.push(e);
                    }
                }
                // Every sender gone: the pacer has finished and every connection answered.
                Ok(None) => return false,
                Err(_) => return true,
            }
        }
    });
    let (sent, last) = pacer
        .join()
        .map_err(|_| io::Error::other("the pacing thread panicked"))??;
    // On time, the last connection starts one interval before the end.
    let paced = (last.saturating_duration_since(start) + interval).as_secs_f64();
    let unanswered = || {
        io::Error::other(format!(
            "{} connections still unanswered {} s after the last was due",
            sent - samples.len() as u64 - error_count,
            ANSWER_GRACE.as_secs()
        ))
    };

    let counted: Vec<&Sample> = samples.iter().filter(|s| s.due >= count_from).collect();
    if counted.is_empty() && timed_out {
        return Err(unanswered());
    }
    if counted.is_empty() && error_count > 0 {
        return Err(io::Error::other(format!(
            "{error_count} connections failed, e.g. {}",
            errors.join("; ")
        )));
    }
    if counted.is_empty() {
        return Err(io::Error::other(
            "no connection was due and answered after the first second: raise RATE or SECONDS",
        ));
    }
    let us = |d: Duration| u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
    let mut lat: Vec<u32> = counted
        .iter()
        .map(|s| us(s.done.saturating_duration_since(s.due)))
        .collect();
    let mut lag: Vec<u32> = counted
        .iter()
        .map(|s| us(s.started.saturating_duration_since(s.due)))
        .collect();
    lat.sort_unstable();
    lag.sort_unstable();
    let pct = |v: &[u32], p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)];
    let resumed = counted.iter().filter(|s| s.resumed).count();
    println!(
        "rate {:.0}/s asked, {:.0}/s started; counted {}; resumed {:.1} %; latency µs p50 {} p90 {} p99 {} p99.9 {} max {}; start lag µs median {}, 99th percentile {}",
        rate,
        sent as f64 / paced,
        lat.len(),
        100.0 * resumed as f64 / counted.len() as f64,
        pct(&lat, 0.50),
        pct(&lat, 0.90),
        pct(&lat, 0.99),
        pct(&lat, 0.999),
        lat.last().copied().unwrap_or(0),
        pct(&lag, 0.50),
        pct(&lag, 0.99),
    );
    if timed_out {
        return Err(unanswered());
    }
    if error_count > 0 {
        return Err(io::Error::other(format!(
            "{error_count} connections failed, e.g. {}",
            errors.join("; ")
        )));
    }
    Ok(())
}
