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
//! Run: `cargo bench --bench net`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

use criterion::{Criterion, criterion_group, criterion_main};
use keygate::net::Tcp;
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
}

criterion_group! {
    name = net;
    config = Criterion::default();
    targets = benches
}
criterion_main!(net);
