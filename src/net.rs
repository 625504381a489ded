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
//!
//! [`TlsTcp`] is the [`Tcp`] under a TLS connection: it sends a TLS 1.3 handshake's session
//! tickets with the connection's first answer rather than in a segment of their own.

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

/// The most [`TlsTcp`] holds during a handshake: a flight bigger than this (a long certificate
/// chain) leaves as it is written.
const HOLD_MAX: usize = 16 * 1024;

/// The [`Tcp`] stream under a TLS connection, which sends a TLS 1.3 handshake's last write (the
/// server's session tickets, written once the client's `Finished` is read) together with the
/// connection's first answer instead of in a segment of its own: the client takes the tickets
/// and the answer in one read, and is woken once for them instead of twice. Clients never wait
/// for a ticket (TLS 1.3 sends them after the handshake); a client that sends no request gets
/// its tickets when the connection closes.
///
/// While the handshake runs (from [`TlsTcp::new`] until [`TlsTcp::accepted`]) every write is
/// held, and what is held is sent as soon as the connection would wait for the client (a read
/// that finds nothing), so each flight of the handshake still leaves whole before its answer is
/// awaited; a flush does not send then (the TLS layer flushes after each of its writes). After
/// the handshake nothing new is held, and what is left leaves with the next write, on a flush,
/// on shutdown, or when the stream is dropped; after a TLS 1.2 handshake (whose last flight
/// holds the server's `Finished`, which the client waits for) also when a read finds nothing.
#[derive(Debug)]
pub struct TlsTcp {
    tcp: Tcp,
    held: Vec<u8>,
    hold: Hold,
}

/// When [`TlsTcp`] holds writes, and what sends them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    /// Every write is held; a read that finds nothing sends them.
    Handshake,
    /// Nothing new is held; a read that finds nothing sends what is.
    UntilWait,
    /// Nothing new is held; what is leaves with the first answer.
    UntilAnswer,
}

impl TlsTcp {
    pub fn new(tcp: Tcp) -> Self {
        TlsTcp {
            tcp,
            held: Vec::new(),
            hold: Hold::Handshake,
        }
    }

    /// The handshake is over: writes are sent from now on, after what is held. `tls13`: it
    /// was a TLS 1.3 handshake, whose last write (the tickets) may wait for the first answer.
    pub fn accepted(&mut self, tls13: bool) {
        self.hold = if tls13 {
            Hold::UntilAnswer
        } else {
            Hold::UntilWait
        };
    }

    /// Writes out what is held; ready once nothing is.
    fn poll_release(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.held.is_empty() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.held))?;
            self.sent(n)?;
        }
        Poll::Ready(Ok(()))
    }

    /// Accounts for `n` bytes written from the front of what is held.
    fn sent(&mut self, n: usize) -> io::Result<()> {
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        if n < self.held.len() {
            self.held.drain(..n);
        } else {
            // The buffer goes with its bytes: an open connection keeps none it does not use.
            self.held = Vec::new();
        }
        Ok(())
    }
}

impl Drop for TlsTcp {
    fn drop(&mut self) {
        // A handshake that failed leaves its alert here; a best effort, as a close is.
        if !self.held.is_empty() {
            let _ = self.tcp.try_write(&self.held);
        }
    }
}

impl AsyncRead for TlsTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let read = Pin::new(&mut this.tcp).poll_read(cx, buf);
        if read.is_pending() && !this.held.is_empty() && this.hold != Hold::UntilAnswer {
            // The connection waits for the client: what the client waits for leaves first. The
            // read's interest is registered; so is the write's if the socket is full.
            ready!(this.poll_release(cx))?;
            return Poll::Pending;
        }
        read
    }
}

impl AsyncWrite for TlsTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        src: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(src)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if this.hold == Hold::Handshake && this.held.len() + len <= HOLD_MAX {
            for b in bufs {
                this.held.extend_from_slice(b);
            }
            return Poll::Ready(Ok(len));
        }
        // What is held, then as many of `bufs` as one writev takes here.
        const GATHER: usize = 16;
        loop {
            if this.held.is_empty() {
                return Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs);
            }
            let mut slices = [IoSlice::new(&[]); GATHER];
            slices[0] = IoSlice::new(&this.held);
            let mut k = 1;
            for b in bufs.iter().take(GATHER - 1) {
                slices[k] = *b;
                k += 1;
            }
            let n = ready!(Pin::new(&mut this.tcp).poll_write_vectored(cx, &slices[..k]))?;
            let held = this.held.len();
            this.sent(n)?;
            if n > held {
                return Poll::Ready(Ok(n - held));
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.hold == Hold::Handshake {
            return Poll::Ready(Ok(()));
        }
        this.poll_release(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_release(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
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

    /// Whether any byte arrives at `peer` within 100 ms.
    async fn arrives(peer: &TcpStream) -> bool {
        let mut b = [0u8; 1];
        tokio::time::timeout(std::time::Duration::from_millis(100), peer.peek(&mut b))
            .await
            .is_ok()
    }

    /// Reads on `tls` until it would wait (it finds nothing for 50 ms); what it read.
    async fn read_until_it_waits(tls: &mut TlsTcp) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while let Ok(n) =
            tokio::time::timeout(std::time::Duration::from_millis(50), tls.read(&mut buf)).await
        {
            got.extend_from_slice(&buf[..n.unwrap()]);
        }
        got
    }

    #[tokio::test]
    async fn a_handshake_write_leaves_when_the_connection_waits_for_the_peer() {
        let (tcp, mut peer) = pair().await;
        let mut tls = TlsTcp::new(tcp);
        tls.write_all(b"server ").await.unwrap();
        let n = tls
            .write_vectored(&[IoSlice::new(b"hello "), IoSlice::new(b"flight")])
            .await
            .unwrap();
        assert_eq!(n, 12, "a handshake write is taken whole");
        tls.flush().await.unwrap();
        assert!(!arrives(&peer).await, "a handshake write waits for a read");
        // The peer's bytes already there are read without sending anything.
        peer.write_all(b"early").await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let mut buf = [0u8; 64];
        let n = tls.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"early");
        assert!(!arrives(&peer).await);
        // A read that finds nothing sends the flight, whole, before it waits.
        assert!(read_until_it_waits(&mut tls).await.is_empty());
        let mut got = [0u8; 19];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"server hello flight");
        peer.write_all(b"finished").await.unwrap();
        let n = tls.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"finished");
    }

    #[tokio::test]
    async fn a_tls13_ticket_leaves_with_the_first_answer() {
        let (tcp, mut peer) = pair().await;
        let mut tls = TlsTcp::new(tcp);
        tls.write_all(b"ticket;").await.unwrap();
        tls.flush().await.unwrap();
        tls.accepted(true);
        peer.write_all(b"request").await.unwrap();
        // Neither the read of the request nor waiting for more sends the ticket.
        assert_eq!(read_until_it_waits(&mut tls).await, b"request");
        assert!(!arrives(&peer).await, "the ticket waits for the answer");
        tls.write_all(b"answer").await.unwrap();
        let mut got = [0u8; 13];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ticket;answer");
        // Later writes are not held.
        tls.write_all(b"more").await.unwrap();
        let mut got = [0u8; 4];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"more");
    }

    #[tokio::test]
    async fn after_a_tls12_handshake_its_last_flight_leaves_when_the_connection_waits() {
        let (tcp, mut peer) = pair().await;
        let mut tls = TlsTcp::new(tcp);
        tls.write_all(b"finished").await.unwrap();
        tls.accepted(false);
        assert!(read_until_it_waits(&mut tls).await.is_empty());
        let mut got = [0u8; 8];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"finished");
        // A write after it is sent at once.
        tls.write_all(b"answer").await.unwrap();
        let mut got = [0u8; 6];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"answer");
    }

    #[tokio::test]
    async fn a_flush_a_shutdown_or_a_drop_after_the_handshake_sends_what_is_held() {
        // Flush.
        let (tcp, mut peer) = pair().await;
        let mut tls = TlsTcp::new(tcp);
        tls.write_all(b"ticket").await.unwrap();
        tls.accepted(true);
        tls.flush().await.unwrap();
        let mut got = [0u8; 6];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ticket");
        // Shutdown: what is held, then the end.
        let (tcp, mut peer) = pair().await;
        let mut tls = TlsTcp::new(tcp);
        tls.write_all(b"ticket").await.unwrap();
        tls.accepted(true);
        tls.shutdown().await.unwrap();
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ticket");
        // Drop, even during the handshake (a failed one's alert).
        let (tcp, mut peer) = pair().await;
        let mut tls = TlsTcp::new(tcp);
        tls.write_all(b"alert").await.unwrap();
        drop(tls);
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"alert");
    }

    #[tokio::test]
    async fn a_flight_over_the_hold_limit_leaves_as_it_is_written() {
        let (tcp, mut peer) = pair().await;
        let mut tls = TlsTcp::new(tcp);
        tls.write_all(b"head;").await.unwrap();
        let big = vec![b'c'; HOLD_MAX];
        tls.write_all(&big).await.unwrap();
        let mut got = vec![0u8; 5 + HOLD_MAX];
        tokio::time::timeout(std::time::Duration::from_secs(5), peer.read_exact(&mut got))
            .await
            .expect("sent without a read")
            .unwrap();
        assert_eq!(&got[..5], b"head;");
        assert!(got[5..].iter().all(|&b| b == b'c'));
    }

    #[tokio::test]
    async fn what_is_held_and_long_or_scattered_answers_arrive_whole_and_in_order() {
        // An answer past the socket buffer after a held ticket: the writes that take part of
        // it, and the waits for room, keep the order.
        let (tcp, mut peer) = pair().await;
        let mut tls = TlsTcp::new(tcp);
        tls.write_all(b"ticket").await.unwrap();
        tls.accepted(true);
        let data: Vec<u8> = (0..8 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        let mut expect = b"ticket".to_vec();
        expect.extend_from_slice(&data);
        let writer = tokio::spawn(async move {
            tls.write_all(&data).await.unwrap();
            tls.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        assert!(got == expect, "{} bytes of {}", got.len(), expect.len());
        writer.await.unwrap();

        // More slices than one gathered write takes with what is held.
        let (tcp, mut peer) = pair().await;
        let mut tls = TlsTcp::new(tcp);
        tls.write_all(b"t").await.unwrap();
        tls.accepted(true);
        let parts: Vec<Vec<u8>> = (0..40u8).map(|i| vec![b'a' + i % 26; 3]).collect();
        let mut expect = b"t".to_vec();
        for p in &parts {
            expect.extend_from_slice(p);
        }
        let mut done = 0;
        let total: usize = parts.iter().map(Vec::len).sum();
        while done < total {
            // The slices from byte `done` on.
            let mut rest = Vec::new();
            let mut skip = done;
            for p in &parts {
                if skip >= p.len() {
                    skip -= p.len();
                    continue;
                }
                rest.push(IoSlice::new(&p[skip..]));
                skip = 0;
            }
            let n = tls.write_vectored(&rest).await.unwrap();
            assert!(n > 0);
            done += n;
        }
        tls.shutdown().await.unwrap();
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, expect);
    }
}
