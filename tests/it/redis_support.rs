//! A real `redis-server` per test: its own temp dir, a free loopback port and a unix socket,
//! no RDB snapshots, the append-only file on (so a restart finds the data again), killed on drop.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    dir: tempfile::TempDir,
    port: u16,
    /// The TLS port and its settings, when the server also speaks TLS.
    tls: Option<(u16, TlsSetup)>,
    /// More `redis-server` arguments (replication, cluster mode).
    args: Vec<String>,
    child: Option<Child>,
}

/// The TLS side of a server: its certificate and key, the CA that client certificates must
/// chain to, and whether a client certificate is required (mutual TLS).
#[derive(Clone)]
pub struct TlsSetup {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    pub require_client_cert: bool,
}

/// Certificates for TLS tests, generated in a temp dir: a CA, a server certificate for
/// `127.0.0.1` / `localhost` and a client certificate (both issued by that CA), a server
/// certificate for another name (issued by the same CA), and an unrelated CA.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub other_name_cert: PathBuf,
    pub other_name_key: PathBuf,
    pub other_ca: PathBuf,
}

impl Pki {
    pub fn generate() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: String| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let ca = |cn: &str| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
            let cert = params.self_signed(&key).unwrap();
            (cert, rcgen::Issuer::new(params, key))
        };
        let leaf = |names: &[&str], issuer: &rcgen::Issuer<'_, KeyPair>| {
            let key = KeyPair::generate().unwrap();
            let names = names.iter().map(|s| s.to_string()).collect::<Vec<_>>();
            let cert = CertificateParams::new(names)
                .unwrap()
                .signed_by(&key, issuer)
                .unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (ca_cert, issuer) = ca("keygate redis test CA");
        let (other_ca_cert, _) = ca("some other CA");
        let (server_cert, server_key) = leaf(&["127.0.0.1", "localhost"], &issuer);
        let (client_cert, client_key) = leaf(&["keygate-client"], &issuer);
        let (other_name_cert, other_name_key) = leaf(&["redis.example.com"], &issuer);
        Pki {
            ca: write("ca.pem", ca_cert.pem()),
            server_cert: write("server.pem", server_cert),
            server_key: write("server.key", server_key),
            client_cert: write("client.pem", client_cert),
            client_key: write("client.key", client_key),
            other_name_cert: write("other-name.pem", other_name_cert),
            other_name_key: write("other-name.key", other_name_key),
            other_ca: write("other-ca.pem", other_ca_cert.pem()),
            dir,
        }
    }

    /// The server side with this PKI's server certificate.
    pub fn server(&self, require_client_cert: bool) -> TlsSetup {
        TlsSetup {
            cert: self.server_cert.clone(),
            key: self.server_key.clone(),
            client_ca: self.ca.clone(),
            require_client_cert,
        }
    }
}

impl RedisServer {
    /// Starts a server; panics (failing the test) when `redis-server` is not installed.
    pub fn start() -> RedisServer {
        Self::start_with(None)
    }

    /// Starts a server that also listens with TLS (on [`RedisServer::tls_port`]).
    pub fn start_tls(tls: TlsSetup) -> RedisServer {
        Self::start_with(Some(tls))
    }

    fn start_with(tls: Option<TlsSetup>) -> RedisServer {
        Self::start_full(tls, &[])
    }

    /// Starts a server with more `redis-server` arguments, e.g. `["--replicaof", "127.0.0.1",
    /// "6379"]` or `["--cluster-enabled", "yes"]`.
    pub fn start_args(args: &[&str]) -> RedisServer {
        Self::start_full(None, args)
    }

    fn start_full(tls: Option<TlsSetup>, args: &[&str]) -> RedisServer {
        for _ in 0..5 {
            let mut server = RedisServer {
                dir: data_dir(),
                port: free_port(),
                tls: tls.clone().map(|t| (free_port(), t)),
                args: args.iter().map(|a| a.to_string()).collect(),
                child: None,
            };
            if server.spawn() {
                return server;
            }
            // The port was taken between picking and binding it: try another one.
        }
        panic!("redis-server found no free loopback port in 5 tries");
    }

    fn spawn(&mut self) -> bool {
        let dir = self.dir.path();
        let mut cmd = Command::new("redis-server");
        if let Some((port, t)) = &self.tls {
            cmd.args(["--tls-port", &port.to_string()])
                .arg("--tls-cert-file")
                .arg(&t.cert)
                .arg("--tls-key-file")
                .arg(&t.key)
                .arg("--tls-ca-cert-file")
                .arg(&t.client_ca)
                .args([
                    "--tls-auth-clients",
                    if t.require_client_cert { "yes" } else { "no" },
                ]);
        }
        let child = cmd
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--unixsocket")
            .arg(self.socket())
            .args(["--unixsocketperm", "700"])
            .arg("--dir")
            .arg(dir)
            .args(["--save", "", "--appendonly", "yes"])
            // Tests crash a server (SIGKILL) and expect every acknowledged write back after the
            // restart: with `everysec`, a write Redis postpones while a slow fsync runs (a disk
            // other tests keep busy) is acknowledged and then lost with the process. `always`
            // writes before it answers; on the tmpfs of `data_dir` its fsync costs nothing.
            .args([
                "--appendfsync",
                if dir.starts_with(SHM) {
                    "always"
                } else {
                    "everysec"
                },
            ])
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .args(["--daemonize", "no"])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "redis-server is not installed (not found on PATH): run scripts/test.sh, which \
                 installs it (apt-get install redis-server)"
            ),
            Err(e) => panic!("cannot start redis-server: {e}"),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut s) = child.stderr.take() {
                    let _ = s.read_to_string(&mut err);
                }
                let log = log_of(dir);
                if log.contains("Address already in use") {
                    return false;
                }
                panic!("redis-server exited ({status}): {err}{log}");
            }
            if self.answers_ping() {
                self.child = Some(child);
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer within 10 s: {}",
                log_of(dir)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn answers_ping(&self) -> bool {
        let Ok(client) = redis::Client::open(self.unix_url()) else {
            return false;
        };
        let Ok(mut con) = client.get_connection_with_timeout(Duration::from_millis(200)) else {
            return false;
        };
        redis::cmd("PING").query::<String>(&mut con).is_ok()
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("redis.sock")
    }

    /// `redis+unix:///…/redis.sock` (database 0).
    pub fn unix_url(&self) -> String {
        format!("redis+unix://{}", self.socket().display())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The TLS port (servers started with [`RedisServer::start_tls`]).
    pub fn tls_port(&self) -> u16 {
        self.tls.as_ref().expect("a TLS server").0
    }

    /// `rediss://127.0.0.1:TLS_PORT/DB`.
    pub fn tls_url(&self, db: u32) -> String {
        format!("rediss://127.0.0.1:{}/{db}", self.tls_port())
    }

    /// `redis://127.0.0.1:PORT/DB`.
    pub fn tcp_url(&self, db: u32) -> String {
        format!("redis://127.0.0.1:{}/{db}", self.port)
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the process (SIGSTOP): connections stay open and nothing answers, as with a hung
    /// server. `resume` continues it.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("server running").id();
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {pid} failed");
    }

    /// Starts the server again on the same port, socket and data dir (its AOF is replayed).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "kill the server first");
        assert!(self.spawn(), "port {} was taken meanwhile", self.port);
    }

    /// Runs one command on a fresh connection to database `db`.
    pub fn query<T: redis::FromRedisValue>(&self, db: u32, cmd: &mut redis::Cmd) -> T {
        let client = redis::Client::open(self.tcp_url(db)).unwrap();
        let mut con = client
            .get_connection_with_timeout(Duration::from_secs(2))
            .unwrap();
        cmd.query(&mut con).unwrap()
    }

    /// How many times each command ran since the last `CONFIG RESETSTAT`, from
    /// `INFO commandstats` (commands run by scripts included).
    pub fn command_calls(&self) -> std::collections::HashMap<String, u64> {
        let info: String = self.query(0, redis::cmd("INFO").arg("commandstats"));
        info.lines()
            .filter_map(|l| {
                let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = rest
                    .strip_prefix("calls=")?
                    .split(',')
                    .next()?
                    .parse()
                    .ok()?;
                Some((name.to_owned(), calls))
            })
            .collect()
    }

    /// Fails when any command that walks the whole keyspace ran.
    pub fn assert_no_keyspace_scans(&self) {
        let calls = self.command_calls();
        for cmd in ["keys", "scan", "flushdb", "flushall"] {
            assert_eq!(calls.get(cmd), None, "{cmd} was called: {calls:?}");
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.signal("-CONT");
        }
        self.kill();
    }
}

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

pub fn log_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default()
}

const SHM: &str = "/dev/shm";

/// A new directory for a server's data: on the tmpfs `/dev/shm` where there is one (what a
/// killed process wrote stays, and an fsync does not wait for a disk other tests keep busy),
/// else in the system's temporary directory.
pub fn data_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("keygate-redis.")
        .tempdir_in(SHM)
        .or_else(|_| tempfile::tempdir())
        .unwrap()
}
