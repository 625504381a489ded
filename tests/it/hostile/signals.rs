//! A SIGTERM sent the moment the binary says it listens (as an orchestrator may) must drain and
//! exit 0, never meet the default action.

use std::time::Duration;

use super::harness;

#[test]
fn sigterm_right_after_the_listening_line_exits_zero() {
    for _ in 0..15 {
        let dir = tempfile::tempdir().unwrap();
        let text = harness::config("http://127.0.0.1:9", dir.path(), "");
        let mut p = harness::keygate(&text, dir.path()).spawn();
        p.signal("TERM");
        let status = p.wait_exit(Duration::from_secs(10));
        assert!(status.success(), "exit status {status}");
    }
}
