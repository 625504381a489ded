//! Highly available Redis for tests, from real processes on free loopback ports: sentinels
//! (`redis-sentinel`) watching a primary, and a 3-primary cluster made by
//! `redis-cli --cluster create`. Everything is killed on drop.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::redis_support::{RedisServer, TlsSetup, free_port, log_of};

/// The service name the sentinels of these tests monitor.
pub const SERVICE: &str = "kgsvc";

/// One `redis-sentinel` process.
pub struct Sentinel {
    dir: tempfile::TempDir,
    port: u16,
    /// The TLS port, for sentinels started with TLS.
    tls_port: Option<u16>,
    child: Option<Child>,
}

/// How a sentinel reaches the primary and its clients reach it.
#[derive(Default)]
pub struct SentinelOptions<'a> {
    /// Also listen with TLS and reach the primary (given by its TLS port) over TLS.
    pub tls: Option<&'a TlsSetup>,
    /// The primary's ACL user (None: `default`) and password.
    pub auth: Option<(Option<&'a str>, &'a str)>,
}

impl Sentinel {
    /// Starts a sentinel monitoring the primary on `primary_port` as [`SERVICE`], with `quorum`
    /// and short timeouts (down after 1 s, failover timeout 3 s) so that failover tests are quick.
    pub fn start(primary_port: u16, quorum: u32) -> Sentinel {
        Self::start_with(primary_port, quorum, &SentinelOptions::default())
    }

    pub fn start_with(primary_port: u16, quorum: u32, o: &SentinelOptions<'_>) -> Sentinel {
        for _ in 0..5 {
            let dir = crate::redis_support::data_dir();
            let port = free_port();
            let tls_port = o.tls.map(|_| free_port());
            let conf = dir.path().join("sentinel.conf");
            let mut extra = String::new();
            if let (Some(t), Some(tp)) = (o.tls, tls_port) {
                extra += &format!(
                    "tls-port {tp}\ntls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\n\
                     tls-auth-clients no\ntls-replication yes\n",
                    t.cert.display(),
                    t.key.display(),
                    t.client_ca.display()
                );
            }
            if let Some((user, pass)) = o.auth {
                if let Some(u) = user {
                    extra += &format!("sentinel auth-user {SERVICE} {u}\n");
                }
                extra += &format!("sentinel auth-pass {SERVICE} {pass}\n");
            }
            let base = format!(
                "port {port}\nbind 127.0.0.1\ndaemonize no\ndir {dir}\nlogfile {dir}/redis.log\n\
                 sentinel monitor {SERVICE} 127.0.0.1 {primary_port} {quorum}\n\
                 sentinel down-after-milliseconds {SERVICE} 1000\n\
                 sentinel failover-timeout {SERVICE} 3000\n\
                 sentinel parallel-syncs {SERVICE} 2\n",
                dir = dir.path().display()
            );
            // Settings of the monitored service come after the line that defines it.
            std::fs::write(&conf, base + &extra).unwrap();
            let child = match Command::new("redis-sentinel")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
            {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                    "redis-sentinel is not installed: run scripts/test.sh, which installs it \
                     (apt-get install redis-sentinel)"
                ),
                Err(e) => panic!("cannot start redis-sentinel: {e}"),
            };
            let mut s = Sentinel {
                dir,
                port,
                tls_port,
                child: Some(child),
            };
            if s.wait_up() {
                return s;
            }
        }
        panic!("redis-sentinel found no free loopback port in 5 tries");
    }

    fn wait_up(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                let log = log_of(self.dir.path());
                if log.contains("Address already in use") {
                    self.child = None;
                    return false;
                }
                panic!("redis-sentinel exited ({status}): {log}");
            }
            if self.primary().is_some() {
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "redis-sentinel did not answer within 10 s: {}",
                log_of(self.dir.path())
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn tls_port(&self) -> u16 {
        self.tls_port.expect("a sentinel started with TLS")
    }

    /// The port of the primary this sentinel names now.
    pub fn primary(&self) -> Option<u16> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}", self.port)).ok()?;
        let mut con = client
            .get_connection_with_timeout(Duration::from_millis(300))
            .ok()?;
        let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(SERVICE)
            .query(&mut con)
            .ok()?;
        addr.map(|a| a.1)
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `redis+sentinel://127.0.0.1:P1,…/kgsvc/DB`.
pub fn sentinel_url(sentinels: &[Sentinel], db: u32) -> String {
    let list = sentinels
        .iter()
        .map(|s| format!("127.0.0.1:{}", s.port()))
        .collect::<Vec<_>>()
        .join(",");
    format!("redis+sentinel://{list}/{SERVICE}/{db}")
}

/// A Redis Cluster of three primaries (no replicas), every slot assigned and the cluster
/// state `ok` on every node.
pub struct Cluster {
    pub nodes: Vec<RedisServer>,
}

impl Cluster {
    pub fn start() -> Cluster {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::start_args(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-node-timeout",
                    "2000",
                ])
            })
            .collect();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for n in &nodes {
            create.arg(format!("127.0.0.1:{}", n.port()));
        }
        let out = create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli (package redis-tools) is installed");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        for n in &nodes {
            loop {
                let info: String = n.query(0, redis::cmd("CLUSTER").arg("INFO"));
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "cluster not ok: {info}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Cluster { nodes }
    }

    /// `redis+cluster://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3`.
    pub fn url(&self) -> String {
        let list = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect::<Vec<_>>()
            .join(",");
        format!("redis+cluster://{list}")
    }
}
