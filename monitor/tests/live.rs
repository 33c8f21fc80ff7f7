//! The running daemon, looked into: `leakmon dump` asks it over its socket (root only), and
//! `leakmon top` shows what it sees, driven in a real terminal (tmux, 80x24): the leaky
//! fixture's process, its count, its alert, its goroutines; q and SIGTERM exit cleanly. A
//! daemon that is not there, or a socket the user may not open, is said so.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod support;

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use support::{Leakmon, fixture, fixture_versions, leakmon, require_root, start_fixture};

/// A directory anyone may enter (so a refused client is refused by the socket's own mode, not
/// by a directory on the way).
fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("leakmon-live-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn failure(out: &Output) -> String {
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A tmux session of 80x24 running `command`, then saying how it exited.
struct Screen {
    name: String,
}

impl Screen {
    fn start(name: &str, command: &str) -> Self {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", name])
            .output();
        let status = Command::new("tmux")
            .args(["new-session", "-d", "-s", name, "-x", "80", "-y", "24"])
            .arg(format!("{command}; echo EXITED $?; sleep 60"))
            .status()
            .expect("tmux (./x test installs it)");
        assert!(status.success());
        Self {
            name: name.to_owned(),
        }
    }

    fn text(&self) -> String {
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &self.name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, keys: &[&str]) {
        for k in keys {
            let ok = Command::new("tmux")
                .args(["send-keys", "-t", &self.name, k])
                .status()
                .unwrap();
            assert!(ok.success());
            std::thread::sleep(Duration::from_millis(150));
        }
    }

    /// Waits until the screen shows everything in `wanted`.
    fn wait_for(&self, wanted: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = self.text();
            if wanted.iter().all(|w| text.contains(w)) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "the screen never showed {wanted:?}:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.name])
            .output();
    }
}

#[test]
fn the_daemon_serves_dumps_and_the_live_view() {
    require_root();
    let versions = fixture_versions();
    let bin = fixture(&versions[versions.len() - 1], "leaky", false);
    let p = start_fixture(&bin, &["-mode", "once-send", "-count", "3"]);
    let pid = p.pid().to_string();
    let stuck = start_fixture(&bin, &["-mode", "mutex", "-count", "2"]);
    let dir = scratch();
    let socket = dir.join("leakmon.sock");
    let socket = socket.to_str().unwrap();
    let mut lm = Leakmon::start(&[
        "run",
        "--socket",
        socket,
        "--block-threshold",
        "2s",
        "--threads",
        "false",
    ]);
    lm.expect("the fixture's goroutine_leak", |a| {
        a["pid"] == p.pid() && a["kind"] == "goroutine_leak" && a["state"] == "firing"
    });
    lm.expect("the mutex fixture's goroutine_stuck", |a| {
        a["pid"] == stuck.pid() && a["kind"] == "goroutine_stuck" && a["state"] == "firing"
    });
    let mode = std::fs::metadata(socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the socket is root's only");

    // A dump asked of the daemon: the leaked goroutines, with what the daemon has judged.
    let out = leakmon(&["dump", "--socket", socket, "--pid", &pid, "--leaked"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("# leakmon: firing: goroutine_leak (3 goroutines"),
        "{text}"
    );
    assert_eq!(text.matches("goroutine_leak; waiting").count(), 3, "{text}");

    // What only the daemon knows, from watching over time: the stuck goroutines' alert names
    // them, and no other goroutine of the process.
    let out = leakmon(&[
        "dump",
        "--socket",
        socket,
        "--pid",
        &stuck.pid().to_string(),
        "--format",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let judged: Vec<&serde_json::Value> = dump["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| !t["verdict"].is_null())
        .collect();
    assert_eq!(judged.len(), 2, "{dump:#}");
    for t in judged {
        assert_eq!(t["verdict"], "goroutine_stuck", "{t:#}");
        assert_eq!(t["entry"], "main.lockForever", "{t:#}");
        assert!(t["proven"].is_null(), "stuck, not proven leaked: {t:#}");
    }

    // Not root: said so, and nothing else is given.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_leakmon"))
        .args(["dump", "--socket", socket, "--pid", &pid])
        .output()
        .unwrap();
    assert!(
        failure(&out).contains("permission denied: the daemon serves root only"),
        "{out:?}"
    );

    // The live view: the process with its alert, then its goroutines; q leaves.
    let top = Screen::start(
        &format!("leakmon-top-{}", std::process::id()),
        &format!("{} top --socket {socket}", env!("CARGO_BIN_EXE_leakmon")),
    );
    top.wait_for(&[&pid, "goroutine_leak", "Firing alerts", "? help"]);
    top.keys(&["/"]);
    top.keys(&[&pid, "Enter", "Enter"]);
    let drilled = top.wait_for(&["chan send", "main.sendOnce", "goroutine_leak"]);
    assert!(drilled.contains(&format!("PID {pid}")), "{drilled}");
    assert!(
        drilled.lines().any(|l| l.starts_with("3 ")
            && l.contains("chan send")
            && l.contains("goroutine_leak")
            && l.contains("main.sendOnce")),
        "one group of the three leaked goroutines: {drilled}"
    );
    for line in drilled.lines() {
        assert!(line.chars().count() <= 80, "wider than 80 columns: {line}");
    }
    top.keys(&["s", "?"]);
    top.wait_for(&["Keys", "sort tasks by count or by wait time"]);
    top.keys(&["q"]);
    top.wait_for(&["EXITED 0"]);

    // SIGTERM ends it as cleanly.
    let top = Screen::start(
        &format!("leakmon-top-term-{}", std::process::id()),
        &format!("{} top --socket {socket}", env!("CARGO_BIN_EXE_leakmon")),
    );
    top.wait_for(&["Processes"]);
    let pattern = format!("^{} top --socket {socket}", env!("CARGO_BIN_EXE_leakmon"));
    let killed = Command::new("pkill")
        .args(["-TERM", "-f", &pattern])
        .status()
        .unwrap();
    assert!(killed.success());
    top.wait_for(&["EXITED 0"]);

    // The daemon gone: its socket goes with it, and asking says so.
    lm.stop();
    assert!(!Path::new(socket).exists());
    let out = leakmon(&["dump", "--socket", socket, "--pid", &pid]);
    assert!(
        failure(&out).contains("no leakmon daemon socket at"),
        "{out:?}"
    );
    let out = leakmon(&["top", "--socket", socket]);
    assert!(
        failure(&out).contains("is `leakmon run` running?"),
        "{out:?}"
    );
    // A socket left behind by a daemon that died: refused, said so, nothing hangs.
    drop(std::os::unix::net::UnixListener::bind(socket).unwrap());
    let out = leakmon(&["dump", "--socket", socket, "--pid", &pid]);
    assert!(
        failure(&out).contains("no leakmon daemon answers at"),
        "{out:?}"
    );
}
