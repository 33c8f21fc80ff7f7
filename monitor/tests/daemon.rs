//! `leakmon run`: every Go process on the host, found at start and on exec.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod support;

use support::{FAST, Leakmon, fixture, fixture_versions, require_root, start_fixture};

#[test]
fn finds_go_processes_at_start_and_on_exec() {
    require_root();
    let versions = fixture_versions();
    let bin = fixture(&versions[versions.len() - 1], "leaky", false);
    let before = start_fixture(&bin, &["-mode", "mutex"]);
    // No --format: the daemon prints JSON lines by default (Leakmon::start parses them).
    let mut args = vec!["run"];
    args.extend(FAST.iter().take_while(|a| **a != "--format"));
    let mut lm = Leakmon::start(&args);
    lm.wait_stderr("Go processes");
    let after = start_fixture(&bin, &["-mode", "send"]);
    let (b, a) = (before.pid(), after.pid());
    lm.expect("stuck alert for the process found at start", |v| {
        v["pid"] == b && v["kind"] == "goroutine_stuck" && v["state"] == "firing"
    });
    lm.expect("leak alert for the process started later", |v| {
        v["pid"] == a && v["kind"] == "goroutine_leak" && v["state"] == "firing"
    });
    drop(after);
    lm.expect("the exited process's alert resolved", |v| {
        v["pid"] == a && v["kind"] == "goroutine_leak" && v["state"] == "resolved"
    });
    // `doctor` shows the running daemon's memory against its budget.
    let doctor = std::process::Command::new(env!("CARGO_BIN_EXE_leakmon"))
        .arg("doctor")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&doctor.stdout);
    let line = out
        .lines()
        .find(|l| l.contains("daemon"))
        .unwrap_or_else(|| panic!("no daemon line: {out}"));
    assert!(line.starts_with("ok"), "{out}");
    assert!(
        line.contains(&format!("PID {}:", lm.proc.pid())) && line.contains("of a 64 MiB budget"),
        "{line}"
    );
}
