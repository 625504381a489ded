//! A SIGTERM sent the moment the binary says it listens (as an orchestrator may) must drain and
//! exit 0, never meet the default action.

use std::process::Command;
use std::time::{Duration, Instant};

use super::harness::{self, Proc, Spawn};

#[test]
fn sigterm_right_after_the_listening_line_exits_zero() {
    for _ in 0..15 {
        let dir = tempfile::tempdir().unwrap();
        let text = harness::config("http://127.0.0.1:9", dir.path(), "");
        let mut p = Proc::spawn(&text, dir.path(), &Spawn::default());
        let pid = p.pid().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let start = Instant::now();
        let status = loop {
            if let Some(s) = p.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(status.success(), "exit status {status}");
    }
}
