//! `leakmon dump`: every goroutine or tokio task of a running, unmodified program, read from
//! outside. The pprof profile is read by the Go toolchain's own `go tool pprof` and compared
//! with the profile the program serves itself; the text dump and `--leaked` are checked
//! against the fixture's known leaks; tokio tasks are named by their future types.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod support;

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use serde_json::Value;
use support::{
    TokioBuild, block_line, fixture, fixture_versions, free_port, go_tool, native_fixture,
    require_root, start_fixture, tokio_fixture, tokio_versions,
};

const LEAKY: &str = "fixtures/go/leaky/main.go";
/// Goroutines the fixture leaks once, on sends nobody receives.
const LEAKED: u64 = 5;

fn dump(pid: u32, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_leakmon"))
        // Taken here: a daemon another test runs may be serving on the default socket.
        .args([
            "dump",
            "--local",
            "--log",
            "warn",
            "--pid",
            &pid.to_string(),
        ])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn dump_ok(pid: u32, args: &[&str]) -> String {
    let out = dump(pid, args);
    assert!(
        out.status.success(),
        "leakmon dump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The goroutine profile the program serves itself (net/http/pprof), saved to `path`.
fn own_profile(port: u16, path: &Path) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        // HTTP/1.0: the body comes whole, not chunked.
        b"GET /debug/pprof/goroutine HTTP/1.0\r\nHost: localhost\r\n\r\n",
    )
    .unwrap();
    let mut body = Vec::new();
    s.read_to_end(&mut body).unwrap();
    let at = body.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(
        body.starts_with(b"HTTP/1.0 200"),
        "pprof endpoint answered: {body:?}"
    );
    std::fs::write(path, &body[at..]).unwrap();
}

/// `go tool pprof -traces` of a profile, as stack -> goroutines (labels left out: Go's own
/// profile has none).
fn traces(go_version: &str, profile: &Path) -> BTreeMap<Vec<String>, u64> {
    let out = Command::new(go_tool(go_version))
        .args(["tool", "pprof", "-traces"])
        .arg(profile)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "go tool pprof failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut traces = BTreeMap::new();
    for block in text.split("-----------+-------------------------------------------------------") {
        let mut count = None;
        let mut frames = Vec::new();
        for line in block.lines() {
            let t = line.trim();
            if t.is_empty() || line.trim_start().contains(":  ") {
                continue;
            }
            if count.is_none() {
                if let Some((n, f)) = t.split_once("   ")
                    && let Ok(n) = n.trim().parse::<u64>()
                {
                    count = Some(n);
                    frames.push(f.trim().to_owned());
                }
            } else {
                frames.push(t.to_owned());
            }
        }
        if let Some(n) = count {
            *traces.entry(frames).or_default() += n;
        }
    }
    traces
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dumps");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// leakmon's pprof goroutine profile of an HTTP server that leaked goroutines names the same
/// stacks with the same counts as Go's own `/debug/pprof/goroutine`, taken just after it, for
/// every goroutine that stays parked: on the oldest and newest Go and a stripped build.
#[test]
fn pprof_profiles_match_the_programs_own() {
    require_root();
    let versions = fixture_versions();
    let (oldest, newest) = (&versions[0], &versions[versions.len() - 1]);
    for (version, stripped) in [(oldest, false), (newest, false), (newest, true)] {
        let what = format!("Go {version}{}", if stripped { ", stripped" } else { "" });
        let bin = fixture(version, "httpserver", stripped);
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let count = LEAKED.to_string();
        let p = start_fixture(&bin, &["-addr", &addr, "-pprof", "-leak", &count]);
        // The fixture says ready once its goroutines are started; give them time to park.
        std::thread::sleep(Duration::from_secs(1));
        let ours = scratch(&format!("leakmon-{version}-{stripped}.pb.gz"));
        let theirs = scratch(&format!("go-{version}-{stripped}.pb.gz"));
        let out = dump(
            p.pid(),
            &["--format", "pprof", "-o", ours.to_str().unwrap()],
        );
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        own_profile(port, &theirs);
        // Parked goroutines, but for the request's own (its connection's reader; the
        // handler writing the profile runs).
        let parked = |mut t: BTreeMap<Vec<String>, u64>| {
            t.retain(|stack, _| {
                stack.first().is_some_and(|f| f == "runtime.gopark")
                    && !stack.iter().any(|f| f.contains("(*connReader)"))
            });
            t
        };
        let ours = parked(traces(newest, &ours));
        let theirs = parked(traces(newest, &theirs));
        assert_eq!(
            ours, theirs,
            "{what}: leakmon's profile (left) vs Go's own (right)"
        );
        let leaked = ours
            .iter()
            .find(|(stack, _)| stack.iter().any(|f| f == "main.leakOnce.func1"))
            .map(|(_, n)| *n);
        assert_eq!(leaked, Some(LEAKED), "{what}: {ours:#?}");
    }
}

/// `--leaked` lists the one-shot leaked goroutines, proven, and none of the healthy ones;
/// the text dump names each one's creator, wait reason, wait time and channel, where Go's
/// dump shape puts them.
#[test]
fn text_dumps_carry_creators_waits_and_verdicts() {
    require_root();
    let versions = fixture_versions();
    let version = &versions[versions.len() - 1];
    let bin = fixture(version, "leaky", false);
    let count = LEAKED.to_string();
    let p = start_fixture(&bin, &["-mode", "once-send", "-count", &count]);
    // The fixture says ready once its goroutines are started; give them time to park.
    std::thread::sleep(Duration::from_secs(1));
    let block = format!("{LEAKY}:{}", block_line(LEAKY, "once-send"));

    let leaked = dump_ok(p.pid(), &["--leaked"]);
    // Blocks of one goroutine each (the dump's own notes come first, a block of their own).
    let blocks: Vec<&str> = leaked
        .split("\n\n")
        .filter(|b| b.lines().any(|l| l.starts_with("goroutine ")))
        .collect();
    assert_eq!(blocks.len() as u64, LEAKED, "{leaked}");
    for b in &blocks {
        let lines: Vec<&str> = b.lines().collect();
        assert!(
            lines[0].starts_with("# leakmon: verdict goroutine_leak; waiting "),
            "{b}"
        );
        assert!(
            lines[0].contains("waits on channel 0x") && lines[0].contains("capacity 0"),
            "{b}"
        );
        assert!(
            lines[1].starts_with("goroutine ") && lines[1].ends_with(" [chan send]:"),
            "{b}"
        );
        assert!(b.contains("main.sendOnce(...)"), "{b}");
        assert!(b.contains(&block), "{block} in {b}");
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("created by main.spawnSendOnce in goroutine ")),
            "{b}"
        );
    }

    // Everything: the healthy goroutines too, with no verdict; JSON says the same.
    let all: Value = serde_json::from_str(&dump_ok(p.pid(), &["--format", "json"])).unwrap();
    let tasks = all["tasks"].as_array().unwrap();
    assert!(tasks.len() as u64 > LEAKED, "{all:#}");
    assert_eq!(all["process"]["pid"], p.pid());
    for t in tasks {
        let leaking = t["entry"] == "main.sendOnce";
        assert_eq!(t["proven"] == true, leaking, "{t:#}");
        if leaking {
            assert_eq!(t["verdict"], "goroutine_leak", "{t:#}");
            assert_eq!(t["wait_reason"], "chan send", "{t:#}");
            assert!(t["waiting_ns"].as_u64().is_some(), "{t:#}");
            assert_eq!(t["waits_on"]["kind"], "channel", "{t:#}");
            assert!(t["created_by"]["task"].as_u64().is_some(), "{t:#}");
        }
    }
    let main = tasks.iter().find(|t| t["id"] == 1).expect("goroutine 1");
    assert_eq!(main["entry"], "runtime.main", "{main:#}");

    // Grouped like debug=1: the five leaked goroutines are one line.
    let grouped = dump_ok(p.pid(), &["--format", "grouped"]);
    assert!(
        grouped.starts_with("goroutine profile: total "),
        "{grouped}"
    );
    assert!(grouped.contains(&format!("\n{LEAKED} @ 0x")), "{grouped}");
}

/// tokio tasks by future type and state, with lost wakers proven, in release and stripped
/// builds.
#[test]
fn tokio_dumps_name_futures_and_states() {
    require_root();
    let versions = tokio_versions();
    let newest = &versions[versions.len() - 1];
    for build in [TokioBuild::Release, TokioBuild::Stripped] {
        let bin = tokio_fixture("tokio-tasks", newest, build);
        let p = start_fixture(&bin, &["lost", "--flavor", "multi"]);
        let all: Value = serde_json::from_str(&dump_ok(p.pid(), &["--format", "json"])).unwrap();
        let tasks = all["tasks"].as_array().unwrap();
        let lost: Vec<&Value> = tasks
            .iter()
            .filter(|t| t["wait_reason"] == "no waker")
            .collect();
        assert_eq!(lost.len(), 3, "{build:?}: {all:#}");
        for t in &lost {
            assert_eq!(t["state"], "idle", "{t:#}");
            assert_eq!(t["waker"], "none", "{t:#}");
            assert_eq!(t["verdict"], "task_lost_waker", "{t:#}");
            let entry = t["entry"].as_str().unwrap();
            match build {
                TokioBuild::Release => assert_eq!(entry, "tokio_tasks::await_forgotten"),
                _ => assert!(entry.starts_with("future@tokio-tasks-"), "{entry}"),
            }
        }
        let text = dump_ok(p.pid(), &["--leaked"]);
        assert_eq!(
            text.matches("\ntask ").count() + usize::from(text.starts_with("task ")),
            3,
            "{text}"
        );
    }
}

/// Bad input: a PID that runs no runtime (said so, threads only), and one that does not exist.
#[test]
fn dumps_of_what_cannot_be_dumped_say_why() {
    require_root();
    let threads = native_fixture("threads");
    let p = start_fixture(&threads, &["pool"]);
    let out = dump(p.pid(), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("runs no runtime whose tasks leakmon reads")
            && stderr.contains("only its threads can be watched"),
        "{stderr}"
    );
    let out = dump(999_999_999, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no process with PID 999999999"), "{stderr}");
}
