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
