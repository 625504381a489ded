//! The real `keygate` binary: check-config, refusal without an admin key, serve + SIGTERM.

use std::time::Duration;

use crate::support::binary::Binary;

#[test]
fn check_config_accepts_the_shipped_file() {
    let out = Binary::command(["check-config", "--config", "config/keygate.toml"])
        .env("KEYGATE_ADMIN_KEY", "an-admin-key-of-decent-length")
        .output();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_config_lists_every_problem_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[proxy]\nlisten = \"nope\"\nupstream = \"ftp://x\"\n[keys]\nprefix = \"\"\n",
    )
    .unwrap();
    let out = Binary::command(["check-config", "--config"])
        .arg(&path)
        .output();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for field in ["proxy.listen", "proxy.upstream", "keys.prefix"] {
        assert!(err.contains(field), "{field} missing from: {err}");
    }
    std::fs::write(&path, "[proxy]\nlisten_on = \"x\"\n").unwrap();
    let out = Binary::command(["check-config", "--config"])
        .arg(&path)
        .output();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen_on"));
}

/// The default config file (`config/keygate.toml` in the working directory) that is there but
/// cannot be read — not UTF-8, or a directory — stops the command naming it; only a file that
/// is not there reads as every default (it read as every default whatever the error: a gateway
/// without its routes, plans and TLS, and `check-config` said OK).
#[test]
fn a_default_config_file_that_cannot_be_read_is_refused_not_taken_as_none() {
    let key = "an-admin-key-of-decent-length";
    let dir = tempfile::tempdir().unwrap();
    let check = || {
        Binary::command(["check-config"])
            .env("KEYGATE_ADMIN_KEY", key)
            .current_dir(dir.path())
            .output()
    };
    // No file: every default.
    let out = check();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::create_dir(dir.path().join("config")).unwrap();
    let path = dir.path().join("config/keygate.toml");
    for (what, write) in [("not UTF-8", true), ("a directory", false)] {
        if write {
            std::fs::write(&path, b"# caf\xe9\n[proxy]\nlisten = \"127.0.0.1:0\"\n").unwrap();
        } else {
            std::fs::remove_file(&path).unwrap();
            std::fs::create_dir(&path).unwrap();
        }
        let out = check();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {err}");
        assert!(
            err.contains("cannot read config file config/keygate.toml"),
            "{what}: {err}"
        );
    }
}

/// A variable of the environment that is not UTF-8 stops nothing when it is not keygate's (it
/// made every command panic), and one of keygate's stops the command naming it.
#[test]
fn an_environment_variable_that_is_not_utf8_is_named_or_left_alone() {
    use std::os::unix::ffi::OsStrExt;
    let bad = std::ffi::OsStr::from_bytes(b"\xff\xfe");
    let out = Binary::command(["check-config", "--config", "config/keygate.toml"])
        .env("KEYGATE_ADMIN_KEY", "an-admin-key-of-decent-length")
        .env("SOMETHING_ELSE", bad)
        .output();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Binary::command(["check-config", "--config", "config/keygate.toml"])
        .env("KEYGATE_ADMIN_KEY", "an-admin-key-of-decent-length")
        .env("KEYGATE_UPSTREAM", bad)
        .output();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("KEYGATE_UPSTREAM is not valid UTF-8"), "{err}");
}

#[test]
fn serve_refuses_to_start_without_an_admin_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = Binary::command([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ])
    .arg("--store")
    .arg(format!("sqlite://{}", dir.path().join("k.db").display()))
    .current_dir(dir.path())
    .output();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no admin key"));
}

#[test]
fn serve_exits_zero_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    // Human logs: the listening line is found in that format too.
    let mut p = Binary::command([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ])
    .arg("--store")
    .arg(format!("sqlite://{}", dir.path().join("k.db").display()))
    .env("KEYGATE_ADMIN_KEY", "an-admin-key-of-decent-length")
    .current_dir(dir.path())
    .spawn();
    p.signal("TERM");
    let status = p.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
}

/// SIGHUP, a habit for "reload", neither ends a keygate without TLS (its default action would:
/// no drain, no usage flush) nor disturbs it: logged as reloading the certificates only; a
/// SIGTERM afterwards still drains and flushes.
#[test]
fn sighup_without_tls_is_logged_and_serving_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let config = crate::support::config_text("http://127.0.0.1:9", &dir.path().join("k.db"), "");
    let mut gw = Binary::serve(&config, dir.path()).spawn();
    gw.signal("HUP");
    gw.wait_for_line("other settings take a restart", Duration::from_secs(10));
    assert!(gw.alive());
    assert!(health(gw.proxy).contains(" 200 "));
    assert!(gw.terminate().success());
    assert!(gw.log_contains("usage flushed"));
}

/// SIGHUP is caught from before the store opens: a keygate waiting for another process's
/// SQLite file is not ended by one (its default action), and starts once the file is free.
#[test]
fn sighup_while_waiting_for_the_sqlite_file_does_not_end_keygate() {
    let dir = tempfile::tempdir().unwrap();
    let second_dir = tempfile::tempdir().unwrap();
    let config = crate::support::config_text(
        "http://127.0.0.1:9",
        &dir.path().join("k.db"),
        "[server]\nshutdown_grace_secs = 20\n",
    );
    let mut first = Binary::serve(&config, dir.path()).spawn();
    let waiting = {
        let (config, at) = (config.clone(), second_dir.path().to_owned());
        std::thread::spawn(move || Binary::serve(&config, &at).spawn())
    };
    // The second's own config file names it among the processes.
    let marker = second_dir.path().join("keygate.toml");
    let pid = (0..500)
        .find_map(|_| {
            std::thread::sleep(Duration::from_millis(10));
            let out = std::process::Command::new("pgrep")
                .args(["-f", &marker.display().to_string()])
                .output()
                .ok()?;
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .next()
                .map(str::to_owned)
        })
        .expect("the second keygate runs");
    std::thread::sleep(Duration::from_millis(500));
    let sent = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(sent.success());
    std::thread::sleep(Duration::from_millis(300));
    assert!(first.terminate().success());
    let mut second = waiting
        .join()
        .expect("the second started after the first let go");
    assert!(second.log_contains("waiting for it to exit"));
    assert!(health(second.proxy).contains(" 200 "));
    assert!(second.terminate().success());
}

/// One process per SQLite file: a second `keygate serve` on the file of a running one says it
/// waits, waits as long as a shutdown may take and 5 s more (`shutdown_grace_secs = 1` here),
/// then exits non-zero naming the file; the first serves on, and once it has stopped the file
/// opens again at once.
#[test]
fn a_second_process_on_the_same_sqlite_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = crate::support::config_text(
        "http://127.0.0.1:9",
        &dir.path().join("k.db"),
        "[server]\nshutdown_grace_secs = 1\n",
    );
    let mut first = Binary::serve(&config, dir.path()).spawn();
    let started = std::time::Instant::now();
    let out = Binary::serve(&config, dir.path()).output_within(Duration::from_secs(30));
    let waited = started.elapsed();
    let printed =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{printed}");
    assert!(
        printed.contains("waiting for it to exit")
            && printed.contains("in use by another keygate process")
            && printed.contains("k.db"),
        "{printed}"
    );
    assert!(
        (Duration::from_secs(5)..Duration::from_secs(20)).contains(&waited),
        "gave up after {waited:?}"
    );
    assert!(first.alive());
    assert!(
        health(first.proxy).contains(" 200 "),
        "{}",
        health(first.proxy)
    );
    assert!(first.terminate().success());
    let started = std::time::Instant::now();
    let mut again = Binary::serve(&config, dir.path()).spawn();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(!again.log_contains("waiting for it to exit"));
    assert!(health(again.proxy).contains(" 200 "));
    assert!(again.terminate().success());
}

/// In how many of `samples` looks, 5 ms apart, the main thread (the current-thread runtime's
/// event loop) was runnable.
fn runnable_samples(gw: &Binary, samples: usize) -> usize {
    (0..samples)
        .filter(|_| {
            std::thread::sleep(Duration::from_millis(5));
            gw.main_thread_state() == 'R'
        })
        .count()
}

/// One GET over a fresh connection: the whole response.
fn get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// One request to the health path over a fresh connection: the status line.
fn health(proxy: std::net::SocketAddr) -> String {
    get(proxy, "/_keygate/health")
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// `keygate_event_loop_pauses_total` from the admin listener's metrics.
fn pauses(gw: &Binary) -> u64 {
    let metrics = get(gw.admin, "/metrics");
    let line = metrics
        .lines()
        .find(|l| l.starts_with("keygate_event_loop_pauses_total "))
        .unwrap_or_else(|| panic!("no pauses counter in:\n{metrics}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn event_coalescing_pauses_a_busy_event_loop_and_serves_as_usual() {
    for coalesce in [200, 0] {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::support::config_text(
            "http://127.0.0.1:9",
            &dir.path().join("k.db"),
            &format!("[server]\nworker_threads = 1\nevent_coalesce_us = {coalesce}\n"),
        );
        let mut gw = Binary::serve(&config, dir.path()).spawn();
        // A burst from four clients, a new connection per request: the event loop's waits
        // between their packets are far shorter than a millisecond, so it is busy.
        let proxy = gw.proxy;
        let answers: Vec<String> = std::thread::scope(|s| {
            let clients: Vec<_> = (0..4)
                .map(|_| s.spawn(move || (0..100).map(|_| health(proxy)).collect::<Vec<_>>()))
                .collect();
            clients
                .into_iter()
                .flat_map(|c| c.join().unwrap())
                .collect()
        });
        assert_eq!(answers.len(), 400);
        assert!(
            answers.iter().all(|a| a == "HTTP/1.1 200 OK"),
            "event_coalesce_us = {coalesce}: {:?}",
            answers.iter().find(|a| *a != "HTTP/1.1 200 OK")
        );
        let taken = pauses(&gw);
        if coalesce == 0 {
            assert_eq!(taken, 0, "coalescing off, yet {taken} pauses");
        } else {
            assert!(
                taken > 0,
                "event_coalesce_us = {coalesce}: no pause in a burst"
            );
        }
        assert!(gw.terminate().success());
    }
}

#[test]
fn event_coalescing_stops_pausing_where_the_pause_holds_a_client_back() {
    let dir = tempfile::tempdir().unwrap();
    let config = crate::support::config_text(
        "http://127.0.0.1:9",
        &dir.path().join("k.db"),
        "[server]\nworker_threads = 1\nevent_coalesce_us = 200\n",
    );
    let mut gw = Binary::serve(&config, dir.path()).spawn();
    // One client that sends its next request as soon as the last is answered, for 1.5 s:
    // every pause would hold it back (one pause per request at least). The loop's trial of
    // the pause and its probe without find that, and it stops pausing but for its trials.
    let began = std::time::Instant::now();
    let mut requests = 0u64;
    while began.elapsed() < std::time::Duration::from_millis(1_500) {
        assert_eq!(health(gw.proxy), "HTTP/1.1 200 OK");
        requests += 1;
    }
    let taken = pauses(&gw);
    assert!(taken > 0, "no trial of the pause in {requests} requests");
    assert!(
        taken * 4 < requests,
        "{taken} pauses in {requests} requests: the pause went on though it held the client back"
    );
    assert!(gw.terminate().success());
}

/// `check-config` on a config whose `[server]` section holds `lines`: whether it passed, and
/// what it wrote to stderr.
fn check_server_section(dir: &std::path::Path, lines: &str) -> (bool, String) {
    let path = dir.join("server.toml");
    std::fs::write(
        &path,
        crate::support::config_text(
            "http://127.0.0.1:9",
            &dir.join("k.db"),
            &format!("[server]\n{lines}\n"),
        ),
    )
    .unwrap();
    let out = Binary::command(["check-config", "--config"])
        .arg(&path)
        .output();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn event_coalescing_is_bounded_and_excludes_busy_polling() {
    let dir = tempfile::tempdir().unwrap();
    let check = |server: &str| check_server_section(dir.path(), server);
    let (ok, err) = check("event_coalesce_us = 1000");
    assert!(ok, "{err}");
    let (ok, err) = check("event_coalesce_us = 1001");
    assert!(!ok, "1001 accepted");
    assert!(
        err.contains("server.event_coalesce_us") && err.contains("at most 1000"),
        "{err}"
    );
    let (ok, err) = check("event_coalesce_us = -1");
    assert!(!ok, "-1 accepted");
    assert!(err.contains("event_coalesce_us"), "{err}");
    let (ok, err) = check("worker_threads = 1\nbusy_polling = true\nevent_coalesce_us = 50");
    assert!(!ok, "busy polling and coalescing accepted together");
    assert!(
        err.contains("server.event_coalesce_us") && err.contains("busy_polling"),
        "{err}"
    );
}

#[test]
fn busy_polling_keeps_the_event_loop_runnable_while_idle_and_serves_and_stops_as_usual() {
    let dir = tempfile::tempdir().unwrap();
    let config = |busy: bool| {
        crate::support::config_text(
            "http://127.0.0.1:9",
            &dir.path().join(format!("k-{busy}.db")),
            &format!("[server]\nworker_threads = 1\nbusy_polling = {busy}\n"),
        )
    };
    let busy_dir = tempfile::tempdir().unwrap();
    let mut busy = Binary::serve(&config(true), busy_dir.path()).spawn();
    let idle_dir = tempfile::tempdir().unwrap();
    let mut idle = Binary::serve(&config(false), idle_dir.path()).spawn();
    assert_eq!(health(busy.proxy), "HTTP/1.1 200 OK");
    assert_eq!(health(idle.proxy), "HTTP/1.1 200 OK");

    // Nothing to do: the busy-polling loop is still runnable (on a CPU or waiting for one,
    // however loaded the machine), the other one sleeps in epoll_wait.
    let samples = 40;
    let spinning = runnable_samples(&busy, samples);
    let sleeping = runnable_samples(&idle, samples);
    assert!(
        spinning >= samples * 3 / 4,
        "busy polling: runnable in {spinning} of {samples} samples"
    );
    assert!(
        sleeping <= samples / 4,
        "without busy polling: runnable in {sleeping} of {samples} samples"
    );

    // Still serving, and SIGTERM still ends it cleanly.
    assert_eq!(health(busy.proxy), "HTTP/1.1 200 OK");
    assert!(busy.terminate().success());
    assert!(idle.terminate().success());
}

#[test]
fn listen_backlog_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    for ok in ["listen_backlog = 1", "listen_backlog = 65535"] {
        let (passed, err) = check_server_section(dir.path(), ok);
        assert!(passed, "{ok}: {err}");
    }
    for bad in ["listen_backlog = 0", "listen_backlog = 65536"] {
        let (passed, err) = check_server_section(dir.path(), bad);
        assert!(!passed, "{bad} accepted");
        assert!(
            err.contains("server.listen_backlog") && err.contains("1 to 65535"),
            "{bad}: {err}"
        );
    }
    for bad in ["listen_backlog = -1", "listen_backlog = \"many\""] {
        let (passed, err) = check_server_section(dir.path(), bad);
        assert!(!passed, "{bad} accepted");
        assert!(err.contains("listen_backlog"), "{bad}: {err}");
    }
}

/// The backlog of the listener on `addr` as the kernel reports it (`ss`: a listening socket's
/// Send-Q is its backlog).
fn listen_backlog(addr: std::net::SocketAddr) -> u32 {
    let out = std::process::Command::new("ss")
        .args(["-Hltn", &format!("sport = :{}", addr.port())])
        .output()
        .expect("ss (iproute2) runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains(&addr.to_string()))
        .unwrap_or_else(|| panic!("no listener on {addr} in: {text}"));
    line.split_whitespace()
        .nth(2)
        .and_then(|q| q.parse().ok())
        .unwrap_or_else(|| panic!("no Send-Q in: {line}"))
}

#[test]
fn both_listeners_queue_the_configured_backlog() {
    // The kernel caps a backlog at net.core.somaxconn.
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    for (section, expected) in [("", 1024), ("listen_backlog = 700", 700)] {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::support::config_text(
            "http://127.0.0.1:9",
            &dir.path().join("k.db"),
            &format!("[server]\n{section}\n"),
        );
        let mut gw = Binary::serve(&config, dir.path()).spawn();
        assert_eq!(health(gw.proxy), "HTTP/1.1 200 OK");
        for addr in [gw.proxy, gw.admin] {
            assert_eq!(
                listen_backlog(addr),
                expected.min(somaxconn),
                "{addr} with [server] {section:?}"
            );
        }
        assert!(gw.terminate().success());
    }
}

#[test]
fn busy_polling_with_more_than_one_worker_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for workers in [0, 2] {
        let (ok, err) = check_server_section(
            dir.path(),
            &format!("worker_threads = {workers}\nbusy_polling = true"),
        );
        assert!(!ok, "worker_threads = {workers} accepted");
        assert!(
            err.contains("server.busy_polling") && err.contains("worker_threads = 1"),
            "{err}"
        );
    }
}
