//! Socket reads and writes: std/libc (what tokio's `TcpStream` calls) against the raw system
//! calls of `keygate::net::Tcp` (rustix), on a loopback TCP connection.
//!
//! `syscalls/*`: one round trip in one thread, no event loop: A sends 64 bytes, B receives them,
//! B sends 64, A receives them (four system calls; loopback delivers a send to the peer's queue
//! before it returns, so no call waits). The difference between the two is glibc's wrapper: in a
//! process with more than one thread (keygate's, and this bench's: it starts an idle thread
//! first) each `recv`/`send` goes through a cancellation point.
//!
//! `stream/*`: the same round trip through tokio (a current-thread runtime; each read that finds
//! no readiness waits for the event loop): tokio's `TcpStream` against `net::Tcp`, the way the
//! proxy's fast path reads and writes its client and upstream connections.
//!
//! `tls/*`: a new TLS 1.3 connection per iteration (resumed with the ticket of the one before,
//! as a client that reconnects does), one 64-byte request and its 64-byte answer, client and
//! server in one current-thread runtime: the server's transport a plain `net::Tcp`, which sends
//! the session ticket as soon as the handshake ends, against `net::TlsTcp`, which sends it with
//! the answer (one segment, and one read and readiness event of the client, fewer).
//!
//! Run: `cargo bench --bench net`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

use criterion::{Criterion, criterion_group, criterion_main};
use keygate::net::{Tcp, TlsTcp};
use rustix::net::{RecvFlags, SendFlags};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const MESSAGE: [u8; 64] = [b'x'; 64];

fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (b, _) = listener.accept().unwrap();
    for s in [&a, &b] {
        s.set_nodelay(true).unwrap();
    }
    (a, b)
}

/// A sends [`MESSAGE`], B reads it and answers it, A reads the answer.
async fn round_trip<S: AsyncRead + AsyncWrite + Unpin>((a, b): &mut (S, S), buf: &mut [u8]) {
    a.write_all(&MESSAGE).await.unwrap();
    assert_eq!(b.read(buf).await.unwrap(), MESSAGE.len());
    b.write_all(&MESSAGE).await.unwrap();
    assert_eq!(a.read(buf).await.unwrap(), MESSAGE.len());
}

fn benches(c: &mut Criterion) {
    // keygate is multi-threaded: so is this process, for glibc's wrappers to behave as there.
    let (_park_tx, park_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || park_rx.recv());

    let mut g = c.benchmark_group("syscalls");
    let (mut a, mut b) = pair();
    let mut buf = [0u8; 4096];
    g.bench_function("libc_round_trip", |it| {
        it.iter(|| {
            a.write_all(&MESSAGE).unwrap();
            assert_eq!(b.read(&mut buf).unwrap(), MESSAGE.len());
            b.write_all(&MESSAGE).unwrap();
            assert_eq!(a.read(&mut buf).unwrap(), MESSAGE.len());
        })
    });
    g.bench_function("raw_round_trip", |it| {
        it.iter(|| {
            assert_eq!(
                rustix::net::send(&a, &MESSAGE, SendFlags::NOSIGNAL).unwrap(),
                64
            );
            assert_eq!(
                rustix::net::recv(&b, &mut buf, RecvFlags::empty())
                    .unwrap()
                    .0,
                64
            );
            assert_eq!(
                rustix::net::send(&b, &MESSAGE, SendFlags::NOSIGNAL).unwrap(),
                64
            );
            assert_eq!(
                rustix::net::recv(&a, &mut buf, RecvFlags::empty())
                    .unwrap()
                    .0,
                64
            );
        })
    });
    g.finish();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tokio_pair = || {
        let (a, b) = pair();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        let _guard = rt.enter();
        (
            tokio::net::TcpStream::from_std(a).unwrap(),
            tokio::net::TcpStream::from_std(b).unwrap(),
        )
    };
    let mut g = c.benchmark_group("stream");
    let (a, b) = tokio_pair();
    let mut tokio_streams = (a, b);
    g.bench_function("tokio_round_trip", |it| {
        it.iter(|| rt.block_on(round_trip(&mut tokio_streams, &mut buf)))
    });
    let (a, b) = tokio_pair();
    let mut raw_streams = (Tcp::new(a), Tcp::new(b));
    g.bench_function("raw_round_trip", |it| {
        it.iter(|| rt.block_on(round_trip(&mut raw_streams, &mut buf)))
    });
    g.finish();

    let dir = tempfile::tempdir().unwrap();
    let (acceptor, connector) = tls_pair(dir.path());
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    // Each iteration resumes the session of the one before, as measured.
    for expect in [rustls::HandshakeKind::Full, rustls::HandshakeKind::Resumed] {
        let kind = rt.block_on(new_connection(&listener, &connector, |tcp| {
            let acceptor = acceptor.clone();
            async move { serve_one(acceptor.accept(Tcp::new(tcp)).await.unwrap()).await }
        }));
        assert_eq!(kind, Some(expect));
    }
    let mut g = c.benchmark_group("tls");
    g.bench_function("new_connection_ticket_alone", |it| {
        it.iter(|| {
            rt.block_on(new_connection(&listener, &connector, |tcp| {
                let acceptor = acceptor.clone();
                async move { serve_one(acceptor.accept(Tcp::new(tcp)).await.unwrap()).await }
            }))
        })
    });
    g.bench_function("new_connection_ticket_with_answer", |it| {
        it.iter(|| {
            rt.block_on(new_connection(&listener, &connector, |tcp| {
                let acceptor = acceptor.clone();
                async move {
                    let mut tls = acceptor.accept(TlsTcp::new(Tcp::new(tcp))).await.unwrap();
                    let (io, session) = tls.get_mut();
                    io.accepted(
                        session.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3),
                    );
                    serve_one(tls).await
                }
            }))
        })
    });
    g.finish();
}

/// keygate's TLS server configuration (one ticket per handshake) for a certificate made here,
/// and a client that trusts it and keeps its sessions.
fn tls_pair(dir: &std::path::Path) -> (tokio_rustls::TlsAcceptor, tokio_rustls::TlsConnector) {
    use rcgen::{CertificateParams, KeyPair};
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let reloadable = keygate::tls::ReloadableCert::load(&cert_path, &key_path).unwrap();
    let server = keygate::tls::server_config(std::sync::Arc::new(reloadable), 1);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let mut client = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    (server.into(), std::sync::Arc::new(client).into())
}

/// One client connection to `listener`: its handshake, a request and the answer read whole;
/// `serve` is the server's side of the accepted connection. The client's handshake kind.
async fn new_connection<F: std::future::Future<Output = ()>>(
    listener: &tokio::net::TcpListener,
    connector: &tokio_rustls::TlsConnector,
    serve: impl FnOnce(tokio::net::TcpStream) -> F,
) -> Option<rustls::HandshakeKind> {
    let client = async {
        let tcp = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        tcp.set_nodelay(true).unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        tls.write_all(&MESSAGE).await.unwrap();
        let mut answer = [0u8; 64];
        tls.read_exact(&mut answer).await.unwrap();
        tls.get_ref().1.handshake_kind()
    };
    let server = async {
        let (tcp, _) = listener.accept().await.unwrap();
        tcp.set_nodelay(true).unwrap();
        serve(tcp).await
    };
    tokio::join!(client, server).0
}

/// Reads a request of [`MESSAGE`]'s length and answers it.
async fn serve_one<S: AsyncRead + AsyncWrite + Unpin>(mut tls: S) {
    let mut request = [0u8; 64];
    tls.read_exact(&mut request).await.unwrap();
    tls.write_all(&MESSAGE).await.unwrap();
    tls.flush().await.unwrap();
}

criterion_group! {
    name = net;
    config = Criterion::default();
    targets = benches
}
criterion_main!(net);
