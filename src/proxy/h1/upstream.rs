//! Keep-alive connections to plain `http://` upstreams for the fast path: raw TCP streams with
//! their read buffers, lent to one exchange at a time (LIFO, so few connections stay warm) and
//! given back only when the exchange ended exactly at a message boundary.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use http::uri::Authority;
use tokio::net::TcpStream;

/// Idle upstream connections are kept this long for reuse.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per upstream host.
pub const MAX_IDLE_PER_HOST: usize = 1024;
/// Read buffer of an upstream connection (response heads must fit in it).
pub const BUFFER: usize = 16 * 1024;

/// One upstream connection and what has been read from it.
pub struct Conn {
    pub io: TcpStream,
    pub buf: Vec<u8>,
    /// Bytes `buf[..end]` were read and not yet consumed.
    pub end: usize,
    /// Taken from the pool (it may have been closed by the upstream since).
    pub reused: bool,
    since: Instant,
}

impl Conn {
    fn new(io: TcpStream) -> Self {
        Conn {
            io,
            buf: vec![0; BUFFER],
            end: 0,
            reused: false,
            since: Instant::now(),
        }
    }

    /// Not idle for too long and not closed (nor written to) by its upstream since.
    fn usable(&self) -> bool {
        self.since.elapsed() <= IDLE_TIMEOUT && self.still_idle()
    }

    /// True when the upstream has neither closed the idle connection nor sent anything on it.
    /// Costs a system call only when the reactor saw the socket become readable.
    fn still_idle(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            }
        }
    }
}

/// Idle connections per upstream authority (a handful of upstreams: a list beats a map).
pub struct Pool {
    hosts: Mutex<Vec<(Authority, Vec<Conn>)>>,
    connect_timeout: Duration,
}

/// Why no connection to the upstream could be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect: {0}")]
    Io(std::io::Error),
    #[error("connect timed out")]
    Timeout,
}

impl Pool {
    pub fn new(connect_timeout: Duration) -> Self {
        Pool {
            hosts: Mutex::new(Vec::new()),
            connect_timeout,
        }
    }

    /// The most recently returned idle connection that is still usable (checked outside the
    /// lock; dead ones are dropped outside it too).
    pub fn take(&self, authority: &Authority) -> Option<Conn> {
        loop {
            let mut c = {
                let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
                let (_, idle) = hosts.iter_mut().find(|(a, _)| a == authority)?;
                idle.pop()?
            };
            if c.usable() {
                c.reused = true;
                return Some(c);
            }
        }
    }

    /// Drops connections idle for too long or closed by their upstream (called periodically,
    /// so sockets do not linger in CLOSE_WAIT once traffic stops).
    pub fn sweep(&self) {
        let mut dead = Vec::new();
        {
            let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
            for (_, idle) in hosts.iter_mut() {
                dead.extend(idle.extract_if(.., |c| !c.usable()));
            }
        }
        // Closed here, outside the lock.
        drop(dead);
    }

    /// Gives a connection back after an exchange that ended at a message boundary.
    pub fn put(&self, authority: &Authority, mut conn: Conn) {
        debug_assert_eq!(conn.end, 0);
        let now = Instant::now();
        conn.since = now;
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        let idle = match hosts.iter().position(|(a, _)| a == authority) {
            Some(i) => &mut hosts[i].1,
            None => {
                hosts.push((authority.clone(), Vec::new()));
                &mut hosts.last_mut().expect("just pushed").1
            }
        };
        // The oldest connections sit at the front: drop those idle for too long.
        let stale = idle
            .iter()
            .take_while(|c| now.duration_since(c.since) > IDLE_TIMEOUT)
            .count();
        if stale > 0 {
            idle.drain(..stale);
        }
        if idle.len() < MAX_IDLE_PER_HOST {
            idle.push(conn);
        }
    }

    /// Opens a new connection (every address of the host in turn, within the connect timeout).
    pub async fn connect(&self, authority: &Authority) -> Result<Conn, ConnectError> {
        let port = authority.port_u16().unwrap_or(80);
        let connect = async {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((authority.host(), port))
                .await
                .map_err(ConnectError::Io)?
                .collect();
            let mut last = None;
            for addr in addrs {
                match TcpStream::connect(addr).await {
                    Ok(s) => return Ok(s),
                    Err(e) => last = Some(e),
                }
            }
            Err(ConnectError::Io(last.unwrap_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::NotFound, "no address")
            })))
        };
        let stream = tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| ConnectError::Timeout)??;
        let _ = stream.set_nodelay(true);
        Ok(Conn::new(stream))
    }
}
