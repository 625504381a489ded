//! The real `keygate` binary in a child process: the one way the tests start it, wait until it
//! listens, read what it prints, signal it and reap it.
//!
//! ```ignore
//! let mut gw = Binary::serve(&config, dir.path()).json_logs().spawn();
//! // gw.proxy, gw.admin: the bound addresses, read from the "keygate listening" line
//! assert!(gw.terminate().success());
//! assert!(gw.log_contains("shutdown"));
//! ```

use std::ffi::{OsStr, OsString};
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_keygate");

/// How long a started binary has to print its "keygate listening" line.
const READY_WITHIN: Duration = Duration::from_secs(30);
/// How long [`Binary::terminate`] waits for the exit after SIGTERM.
const EXIT_AFTER_SIGTERM_WITHIN: Duration = Duration::from_secs(15);

/// One `keygate` invocation, to run to completion ([`Launch::output`]) or to start as a server
/// ([`Launch::spawn`]). The test's own `KEYGATE_*` and `RUST_LOG` variables never reach it.
#[must_use]
pub struct Launch {
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    dir: Option<PathBuf>,
    nofile: Option<u64>,
}

/// A running `keygate` (killed with SIGKILL on drop), with its listeners' addresses and every
/// line it has printed so far, stdout and stderr together, in arrival order.
pub struct Binary {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
}

impl Binary {
    /// `keygate serve --config DIR/keygate.toml`, with `config` written to that file, run in
    /// `dir`.
    pub fn serve(config: &str, dir: &Path) -> Launch {
        let path = dir.join("keygate.toml");
        std::fs::write(&path, config).unwrap();
        Binary::command(["serve", "--config"])
            .arg(path)
            .current_dir(dir)
    }

    /// `keygate ARGS`, in the test's working directory unless [`Launch::current_dir`] says
    /// otherwise.
    pub fn command<I, S>(args: I) -> Launch
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Launch {
            args: Vec::new(),
            env: Vec::new(),
            dir: None,
            nofile: None,
        }
        .args(args)
    }
}

impl Launch {
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    pub fn envs<I, K, V>(self, vars: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        vars.into_iter().fold(self, |l, (k, v)| l.env(k, v))
    }

    /// Logs as JSON lines (`KEYGATE_LOG_FORMAT=json`).
    pub fn json_logs(self) -> Self {
        self.env("KEYGATE_LOG_FORMAT", "json")
    }

    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.dir = Some(dir.as_ref().to_owned());
        self
    }

    /// Runs under `prlimit --nofile=N:N` (soft and hard open-file limit).
    pub fn nofile(mut self, n: u64) -> Self {
        self.nofile = Some(n);
        self
    }

    fn command(&self) -> Command {
        let mut cmd = match self.nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        for (k, _) in std::env::vars_os() {
            let name = k.to_string_lossy();
            if name.starts_with("KEYGATE_") || name == "RUST_LOG" {
                cmd.env_remove(&k);
            }
        }
        cmd.args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(dir) = &self.dir {
            cmd.current_dir(dir);
        }
        cmd
    }

    /// Runs to completion with `stdout` as its standard output; the exit status and stderr.
    pub fn output_to(self, stdout: Stdio) -> Output {
        self.command()
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .output()
            .unwrap_or_else(|e| panic!("cannot run keygate: {e}"))
    }

    /// Runs to completion within `limit` (past it the process is killed and the test fails
    /// with what it printed); the exit status and everything printed.
    pub fn output_within(self, limit: Duration) -> Output {
        let child = self
            .command()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run keygate: {e}"));
        let pid = child.id().to_string();
        // Read by another thread, so that a process printing much never blocks on a pipe.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(child.wait_with_output()));
        match rx.recv_timeout(limit) {
            Ok(out) => out.unwrap(),
            Err(_) => {
                let _ = Command::new("kill").args(["-KILL", &pid]).status();
                let out = rx.recv().unwrap().unwrap();
                panic!(
                    "keygate still running after {limit:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }

    /// Runs to completion; the exit status and everything printed.
    pub fn output(self) -> Output {
        self.command()
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run keygate: {e}"))
    }

    /// Starts the process and waits for its "keygate listening" line (JSON or human logs),
    /// from which both addresses are read. Fails the test, with everything printed, when the
    /// process exits first or does not get there within 30 s.
    pub fn spawn(self) -> Binary {
        let mut child = self
            .command()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start keygate (or prlimit): {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let pipes = [
            Box::new(child.stderr.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stdout.take().unwrap()),
        ];
        let readers = pipes
            .into_iter()
            .map(|pipe| {
                let lines = Arc::clone(&lines);
                std::thread::spawn(move || {
                    for l in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                        lines.lock().unwrap().push(l);
                    }
                })
            })
            .collect();
        let deadline = Instant::now() + READY_WITHIN;
        let (proxy, admin) = loop {
            let found = lines
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains("keygate listening"))
                .find_map(|l| Some((logged_addr(l, "proxy")?, logged_addr(l, "admin")?)));
            if let Some(addrs) = found {
                break addrs;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "keygate exited at start ({status}): {:?}",
                    lines.lock().unwrap()
                );
            }
            assert!(
                Instant::now() < deadline,
                "keygate did not start: {:?}",
                lines.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        Binary {
            child,
            lines,
            readers,
            proxy,
            admin,
        }
    }
}

/// The address logged as `field` on a line: a JSON field, or `field=ADDR` in human logs.
fn logged_addr(line: &str, field: &str) -> Option<SocketAddr> {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
        return v[field].as_str()?.parse().ok();
    }
    let start = line.find(&format!(" {field}="))? + field.len() + 2;
    line[start..].split_whitespace().next()?.parse().ok()
}

impl Binary {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the process has not exited.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Every line printed so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    pub fn log_contains(&self, needle: &str) -> bool {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(needle))
    }

    /// Lines that report a panic (the default hook writes "panicked at" to stderr).
    pub fn panics(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("panicked"))
            .cloned()
            .collect()
    }

    /// The first line containing `needle`, printed already or within `limit` (blocks the
    /// thread while it waits).
    pub fn wait_for_line(&self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(l) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return l.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no line with {needle:?} within {limit:?} in {:#?}",
                self.lines()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `signal` (a name as `kill` takes it: "TERM", "HUP"…).
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal} {} failed", self.pid());
    }

    /// SIGTERM, then [`Binary::wait_exit`] for at most 15 s.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal("TERM");
        self.wait_exit(EXIT_AFTER_SIGTERM_WITHIN)
    }

    /// Waits for the process to exit, at most `limit`, and until everything it printed has
    /// been read.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(start.elapsed() < limit, "no exit within {limit:?}");
            std::thread::sleep(Duration::from_millis(5));
        };
        for r in self.readers.drain(..) {
            r.join().unwrap();
        }
        status
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// CPU time (user + system) of the process so far, from /proc.
    pub fn cpu_time(&self) -> Duration {
        let f = stat_fields(&format!("/proc/{}/stat", self.pid()));
        // utime and stime are fields 14 and 15 of stat(5).
        let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        // USER_HZ is 100 on Linux.
        Duration::from_millis(ticks * 10)
    }

    /// The scheduler state of the process's main thread (`R` runnable, `S` sleeping, …): the
    /// thread that runs a current-thread runtime's event loop.
    pub fn main_thread_state(&self) -> char {
        let pid = self.pid();
        let f = stat_fields(&format!("/proc/{pid}/task/{pid}/stat"));
        f[0].chars().next().unwrap()
    }
}

/// The fields of a `/proc/…/stat` file after the parenthesised command name (field 3 on).
fn stat_fields(path: &str) -> Vec<String> {
    let stat = std::fs::read_to_string(path).unwrap();
    stat[stat.rfind(')').unwrap() + 2..]
        .split(' ')
        .map(str::to_owned)
        .collect()
}

impl Drop for Binary {
    fn drop(&mut self) {
        self.kill9();
    }
}

#[test]
fn the_listening_line_is_read_in_either_log_format() {
    let json = r#"{"timestamp":"t","level":"INFO","message":"keygate listening","proxy":"127.0.0.1:1","admin":"[::1]:2"}"#;
    let human =
        "2026-01-01T00:00:00Z  INFO keygate: keygate listening proxy=127.0.0.1:1 admin=[::1]:2";
    for line in [json, human] {
        assert_eq!(
            logged_addr(line, "proxy"),
            Some("127.0.0.1:1".parse().unwrap())
        );
        assert_eq!(logged_addr(line, "admin"), Some("[::1]:2".parse().unwrap()));
        assert_eq!(logged_addr(line, "other"), None);
    }
}
