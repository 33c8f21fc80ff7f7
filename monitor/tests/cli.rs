//! Bad input gets a clear, actionable error and exit status 2; `doctor` reports this host.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod support;

use std::process::{Command, Output};

use support::{fixture, fixture_versions, leakmon, require_root, start_fixture};

/// `leakmon` as user nobody, with no capabilities.
fn unprivileged_leakmon(args: &[&str]) -> Output {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(env!("CARGO_BIN_EXE_leakmon"))
        .args(args)
        .output()
        .unwrap()
}

fn assert_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
    assert!(out.stdout.is_empty(), "no alert output on error");
}

#[test]
fn unknown_pid() {
    assert_error(
        &leakmon(&["watch", "--pid", "999999999"]),
        "no process with PID 999999999",
    );
}

#[test]
fn kernel_threads_and_protected_processes_say_so() {
    require_root();
    // kthreadd: a /proc entry without an executable.
    assert_error(
        &leakmon(&["watch", "--pid", "2"]),
        "PID 2 has no executable (a kernel thread?)",
    );
    // Where the kernel refuses even root (this host's init), the message says that, not
    // "run as root".
    if let Err(e) = std::fs::read_link("/proc/1/exe")
        && e.kind() == std::io::ErrorKind::PermissionDenied
    {
        let out = leakmon(&["watch", "--pid", "1"]);
        assert_error(&out, "PID 1 is protected");
        assert!(!String::from_utf8_lossy(&out.stderr).contains("run as root"));
    }
}

#[test]
fn not_a_go_program() {
    require_root();
    let mut sleep = Command::new("sleep").arg("60").spawn().unwrap();
    // Only goroutines asked for: a program without them is an error.
    let out = leakmon(&["watch", "--threads=false", "--pid", &sleep.id().to_string()]);
    let _ = sleep.kill();
    let _ = sleep.wait();
    assert_error(&out, "not a Go executable");
}

#[test]
fn without_privileges() {
    require_root();
    let versions = fixture_versions();
    let fx = start_fixture(
        &fixture(&versions[0], "leaky", false),
        &["-mode", "healthy"],
    );
    let out = unprivileged_leakmon(&["watch", "--pid", &fx.pid().to_string()]);
    assert_error(&out, "missing privileges");
}

#[test]
fn bad_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("leakmon.toml");
    std::fs::write(&path, "block_treshold = \"1m\"\n").unwrap();
    assert_error(
        &leakmon(&["--config", path.to_str().unwrap(), "watch", "--pid", "1"]),
        "unknown field `block_treshold`",
    );
    assert_error(
        &leakmon(&[
            "--config",
            "/nonexistent/leakmon.toml",
            "watch",
            "--pid",
            "1",
        ]),
        "reading config file /nonexistent/leakmon.toml",
    );
}

#[test]
fn bad_duration() {
    assert_error(
        &leakmon(&["watch", "--pid", "1", "--block-threshold", "soon"]),
        "block_threshold: invalid duration \"soon\"",
    );
}

#[test]
fn doctor_passes_here() {
    require_root();
    let out = leakmon(&["doctor"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    for check in [
        "privileges",
        "kernel BTF",
        "uprobes",
        "tracefs",
        "load programs",
        "discovery",
        "thread probes",
        "watchpoints",
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("ok") && l.contains(check)),
            "{check} not ok: {stdout}"
        );
    }
}

#[test]
fn doctor_fails_without_privileges() {
    let out = unprivileged_leakmon(&["doctor"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("FAIL  privileges"), "{stdout}");
}

#[test]
fn otlp_endpoint_with_tls_is_refused() {
    assert_error(
        &leakmon(&[
            "watch",
            "--pid",
            "1",
            "--otlp-endpoint",
            "https://collector:4317",
        ]),
        "only plain http:// endpoints are supported",
    );
}

/// `leakmon kinds` lists every alert kind with its remedy, and each has a row in the alert
/// docs (a kind added without docs fails here).
#[test]
fn kinds_are_listed_and_documented() {
    let out = leakmon(&["kinds"]);
    assert!(out.status.success(), "{out:?}");
    let listed = String::from_utf8_lossy(&out.stdout);
    let names: Vec<&str> = listed
        .lines()
        .filter(|l| !l.starts_with(' ') && !l.is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(names.len(), 11, "{listed}");
    for expected in ["goroutine_leak", "task_spinning", "thread_deadlock"] {
        assert!(names.contains(&expected), "{expected} not in {names:?}");
    }
    let docs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/alerts.md")).unwrap();
    for name in names {
        assert!(
            docs.contains(&format!("| `{name}` |")),
            "{name} has no row in docs/alerts.md"
        );
    }
}
