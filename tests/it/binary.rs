//! The real `keygate` binary: check-config, refusal without an admin key, serve + SIGTERM.

use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_keygate");

fn clean_env(cmd: &mut Command) -> &mut Command {
    for (k, _) in std::env::vars() {
        if k.starts_with("KEYGATE_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd
}

#[test]
fn check_config_accepts_the_shipped_file() {
    let out =
        clean_env(Command::new(BIN).args(["check-config", "--config", "config/keygate.toml"]))
            .env("KEYGATE_ADMIN_KEY", "an-admin-key-of-decent-length")
            .output()
            .unwrap();
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
    let out = clean_env(
        Command::new(BIN)
            .args(["check-config", "--config"])
            .arg(&path),
    )
    .output()
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for field in ["proxy.listen", "proxy.upstream", "keys.prefix"] {
        assert!(err.contains(field), "{field} missing from: {err}");
    }
    std::fs::write(&path, "[proxy]\nlisten_on = \"x\"\n").unwrap();
    let out = clean_env(
        Command::new(BIN)
            .args(["check-config", "--config"])
            .arg(&path),
    )
    .output()
    .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen_on"));
}

#[test]
fn serve_refuses_to_start_without_an_admin_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = clean_env(Command::new(BIN).args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ]))
    .arg("--store")
    .arg(format!("sqlite://{}", dir.path().join("k.db").display()))
    .current_dir(dir.path())
    .output()
    .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no admin key"));
}

#[test]
fn serve_exits_zero_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = clean_env(Command::new(BIN).args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ]))
    .arg("--store")
    .arg(format!("sqlite://{}", dir.path().join("k.db").display()))
    .env("KEYGATE_ADMIN_KEY", "an-admin-key-of-decent-length")
    .current_dir(dir.path())
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    // Wait for the listening line, then signal.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("keygate logs");
        if line.contains("keygate listening") {
            break;
        }
        assert!(std::time::Instant::now() < deadline);
    }
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
