//! A TCP stream whose reads and writes are the system calls themselves.
//!
//! tokio's `TcpStream` reads and writes through std, which calls libc's `recv`/`send`/`writev`:
//! in a process with more than one thread glibc wraps each of them in its cancellation point
//! (two atomic operations on the thread's cancel state around every call). A connection of the
//! proxy makes four such calls per request (the client's request and answer, the upstream's),
//! and nothing in keygate cancels a thread. [`Tcp`] makes the same calls with rustix's raw
//! system calls and keeps tokio's readiness rules: a read that fills less than the buffer, or a
//! write that takes less than offered, means the socket is drained (full), so its readiness is
//! cleared and the next read (write) waits for the event instead of trying a system call that
//! would fail with `EAGAIN`.
//!
//! A read into a buffer that is not initialized yet (hyper's) goes through tokio's own
//! `poll_read`, which reads into uninitialized memory; initializing it here first would cost a
//! memset per read. The fast path's buffers are initialized once and reused.

use std::io::{self, IoSlice};
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use rustix::net::{RecvFlags, SendFlags};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// A connected TCP stream, read and written with raw system calls (see the module).
#[derive(Debug)]
pub struct Tcp(TcpStream);

impl Tcp {
    pub fn new(stream: TcpStream) -> Self {
        Tcp(stream)
    }
}

impl Deref for Tcp {
    type Target = TcpStream;
    fn deref(&self) -> &TcpStream {
        &self.0
    }
}

impl DerefMut for Tcp {
    fn deref_mut(&mut self) -> &mut TcpStream {
        &mut self.0
    }
}

/// Runs `op` once tokio says the socket is ready for `interest`, as often as it takes, and
/// clears that readiness when `op` finds the socket drained (or full): `Err(WouldBlock)`, or a
/// transfer shorter than `len` (`try_io` clears readiness only on `WouldBlock`, so a short one is
/// reported to it as `WouldBlock` and its count kept aside).
fn poll_transfer(
    s: &TcpStream,
    cx: &mut Context<'_>,
    interest: Interest,
    len: usize,
    mut op: impl FnMut() -> rustix::io::Result<usize>,
) -> Poll<io::Result<usize>> {
    loop {
        let ready = if interest == Interest::READABLE {
            s.poll_read_ready(cx)
        } else {
            s.poll_write_ready(cx)
        };
        ready!(ready)?;
        let mut short = None;
        let r = s.try_io(interest, || {
            let n = op()?;
            if n > 0 && n < len {
                short = Some(n);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        match (r, short) {
            (_, Some(n)) => return Poll::Ready(Ok(n)),
            (Err(e), None) if e.kind() == io::ErrorKind::WouldBlock => {}
            (r, None) => return Poll::Ready(r),
        }
    }
}

impl AsyncRead for Tcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if buf.initialized().len() < buf.capacity() {
            return Pin::new(&mut self.get_mut().0).poll_read(cx, buf);
        }
        let s = &self.0;
        let len = buf.remaining();
        let n = ready!(poll_transfer(s, cx, Interest::READABLE, len, || {
            rustix::net::recv(s, buf.initialize_unfilled(), RecvFlags::empty()).map(|(n, _)| n)
        }))?;
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Tcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        src: &[u8],
    ) -> Poll<io::Result<usize>> {
        let s = &self.0;
        poll_transfer(s, cx, Interest::WRITABLE, src.len(), || {
            rustix::net::send(s, src, SendFlags::NOSIGNAL)
        })
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let s = &self.0;
        let len = bufs.iter().map(|b| b.len()).sum();
        // writev has no MSG_NOSIGNAL: like std's, it relies on SIGPIPE being ignored (Rust
        // programs start with it ignored), so a closed peer is EPIPE.
        poll_transfer(s, cx, Interest::WRITABLE, len, || {
            rustix::io::writev(s, bufs)
        })
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    async fn pair() -> (Tcp, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (accepted, client) = tokio::join!(listener.accept(), client);
        (Tcp::new(accepted.unwrap().0), client.unwrap())
    }

    #[tokio::test]
    async fn reads_and_writes_both_ways_and_sees_the_end() {
        let (mut tcp, mut peer) = pair().await;
        peer.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 64];
        let n = tcp.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"hello");

        tcp.write_all(b"answer").await.unwrap();
        let n = tcp
            .write_vectored(&[IoSlice::new(b" and "), IoSlice::new(b"more")])
            .await
            .unwrap();
        assert_eq!(n, 9);
        let mut got = [0u8; 15];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"answer and more");

        // A read after a short one waits for the next bytes instead of failing.
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            let n = tcp.read(&mut buf).await.unwrap();
            (tcp, buf[..n].to_vec())
        });
        tokio::task::yield_now().await;
        peer.write_all(b"later").await.unwrap();
        let (mut tcp, later) = reader.await.unwrap();
        assert_eq!(later, b"later");

        drop(peer);
        assert_eq!(tcp.read(&mut buf).await.unwrap(), 0, "the peer's FIN");
    }

    #[tokio::test]
    async fn a_full_buffer_read_leaves_the_rest_readable() {
        let (mut tcp, mut peer) = pair().await;
        peer.write_all(&[7u8; 1000]).await.unwrap();
        let mut total = 0;
        let mut buf = [0u8; 100];
        while total < 1000 {
            // A read that filled the buffer keeps the readiness: the next one does not wait for
            // an event that already came (it would wait forever).
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read(&mut buf))
                .await
                .expect("the rest of the bytes were readable")
                .unwrap();
            assert!(n > 0 && buf[..n].iter().all(|&b| b == 7));
            total += n;
        }
        assert_eq!(total, 1000);
    }

    #[tokio::test]
    async fn writes_past_the_socket_buffer_wait_for_room() {
        let (mut tcp, mut peer) = pair().await;
        let data: Vec<u8> = (0..8 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        let expect = data.clone();
        let writer = tokio::spawn(async move {
            tcp.write_all(&data).await.unwrap();
            tcp.shutdown().await.unwrap();
            tcp
        });
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        assert!(
            got == expect,
            "{} bytes arrived of {}",
            got.len(),
            expect.len()
        );
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn a_closed_peer_is_an_error_not_a_signal() {
        let (mut tcp, peer) = pair().await;
        // Closed with unread bytes: the peer answers further segments with a reset.
        tcp.write_all(b"never read").await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        drop(peer);
        let mut failed = false;
        for _ in 0..100 {
            if tcp.write_all(&[0u8; 65536]).await.is_err() {
                failed = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(failed, "writes to a reset connection kept succeeding");
        // writev has no MSG_NOSIGNAL: an error too, not a signal that ends the process.
        let chunk = [0u8; 4096];
        let err = tcp
            .write_vectored(&[IoSlice::new(&chunk), IoSlice::new(&chunk)])
            .await
            .expect_err("a vectored write to a reset connection");
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_uninitialized_buffer_is_read_too() {
        let (mut tcp, mut peer) = pair().await;
        peer.write_all(b"into spare capacity").await.unwrap();
        let mut buf = bytes::BytesMut::with_capacity(64);
        let n = tcp.read_buf(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"into spare capacity");
    }
}
