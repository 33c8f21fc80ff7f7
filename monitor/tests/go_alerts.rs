//! End to end: real Go programs (fixtures/go/leaky, built with each tested Go version) watched
//! by `leakmon watch` through eBPF; each leak of the catalogue must produce its specific alert
//! with the right sites, and resolve when the program releases its goroutines; a healthy
//! program must produce none.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{
    Leakmon, fixture, fixture_versions, go_version_at_least, markers, require_root, start_fixture,
};

struct Case {
    mode: &'static str,
    kind: &'static str,
    /// Wait reason as Go names it, per version.
    reason: fn(&str) -> Option<&'static str>,
    /// The goroutines' entry function (go1.22+; go1.21 names a closure of the caller).
    entry: &'static str,
    /// A word of the remedy the hint must name.
    remedy: &'static str,
    /// Whether the fixture can release its goroutines (SIGUSR1); if not, the alert must
    /// resolve when the process exits.
    releasable: bool,
}

fn check(case: &Case) {
    require_root();
    let markers = markers();
    let (create_line, block_line) = markers[case.mode];
    for version in fixture_versions() {
        let what = format!("{} on go{version}", case.mode);
        let bin = fixture(&version, "leaky", false);
        let fx = start_fixture(&bin, &["-mode", case.mode]);
        let pid = fx.pid();
        let mut lm = Leakmon::watch(&[pid], &[]);
        // With a symbol table, parks are found by scanning the goroutine table (no probe on
        // the hot path).
        lm.wait_stderr("parks seen by scanning runtime.allgs");
        let alert = lm.expect(&format!("{} firing for {what}", case.kind), |a| {
            a["kind"] == case.kind && a["state"] == "firing"
        });
        assert_eq!(alert["pid"], pid, "{what}: {alert:#}");
        assert_eq!(alert["runtime"], "go", "{what}");
        assert_eq!(alert["runtime_version"], format!("go{version}"), "{what}");
        assert_eq!(
            alert["exe"].as_str(),
            Some(bin.to_str().unwrap()),
            "{what}: {alert:#}"
        );
        match (case.reason)(&version) {
            Some(r) => assert_eq!(alert["wait_reason"], r, "{what}: {alert:#}"),
            None => assert!(alert["wait_reason"].is_null(), "{what}: {alert:#}"),
        }
        let created = &alert["created_at"];
        assert!(
            created["file"]
                .as_str()
                .unwrap()
                .ends_with("fixtures/go/leaky/main.go"),
            "{what}: {alert:#}"
        );
        assert_eq!(
            created["line"], create_line,
            "{what}: creation site: {alert:#}"
        );
        let entry = alert["entry"]["function"].as_str().unwrap();
        if go_version_at_least(&version, 22) {
            assert_eq!(entry, case.entry, "{what}: {alert:#}");
        } else {
            assert!(entry.starts_with("main."), "{what}: {alert:#}");
        }
        if case.kind == "goroutine_spinning" {
            assert!(alert["blocked_at"].is_null(), "{what}: {alert:#}");
        } else {
            let blocked = &alert["blocked_at"];
            assert_eq!(
                blocked["line"], block_line,
                "{what}: blocked site: {alert:#}"
            );
            assert_eq!(blocked["function"], case.entry, "{what}: {alert:#}");
            assert!(
                alert["oldest_seconds"].as_f64().unwrap() >= 1.0,
                "{what}: {alert:#}"
            );
        }
        match case.kind {
            "goroutine_leak" if alert["proof"] == "unreachable" => {
                assert_eq!(alert["count"], 3, "{what}: {alert:#}");
                assert_eq!(alert["proven"], 3, "{what}: {alert:#}");
            }
            "goroutine_leak" => {
                assert!(alert["count"].as_u64().unwrap() >= 4, "{what}: {alert:#}");
                assert!(
                    alert["growth_per_minute"].as_f64().unwrap() > 0.0,
                    "{what}: {alert:#}"
                );
            }
            "goroutine_stuck" => assert_eq!(alert["count"], 3, "{what}: {alert:#}"),
            _ => assert_eq!(alert["count"], 1, "{what}: {alert:#}"),
        }
        assert!(
            alert["hint"].as_str().unwrap().contains(case.remedy),
            "{what}: hint should mention {:?}: {alert:#}",
            case.remedy
        );

        if case.releasable {
            fx.signal(libc::SIGUSR1);
        } else {
            drop(fx);
        }
        let resolved = lm.expect(
            &format!("{} resolved for {what}", case.kind),
            |a: &Value| {
                a["kind"] == case.kind && a["state"] == "resolved" && a["created_at"] == *created
            },
        );
        assert_eq!(resolved["pid"], pid);
        assert_eq!(resolved["count"], 0, "{what}: {resolved:#}");
        // Nothing else fired for this program.
        let others: Vec<_> = lm
            .collect_for(Duration::from_millis(500))
            .into_iter()
            .filter(|a| a["kind"] != case.kind)
            .collect();
        assert!(others.is_empty(), "{what}: unexpected alerts {others:#?}");
    }
}

#[test]
fn send_with_no_receiver_is_a_leak() {
    check(&Case {
        mode: "send",
        kind: "goroutine_leak",
        reason: |_| Some("chan send"),
        entry: "main.sendForever",
        remedy: "ctx.Done()",
        releasable: true,
    });
}

#[test]
fn range_over_never_closed_channel_is_a_leak() {
    check(&Case {
        mode: "range",
        kind: "goroutine_leak",
        reason: |_| Some("chan receive"),
        entry: "main.rangeForever",
        remedy: "close",
        releasable: true,
    });
}

#[test]
fn select_that_never_fires_is_a_leak() {
    check(&Case {
        mode: "select",
        kind: "goroutine_leak",
        reason: |_| Some("select"),
        entry: "main.selectForever",
        remedy: "timeout",
        releasable: true,
    });
}

#[test]
fn unbounded_spawning_is_a_leak() {
    check(&Case {
        mode: "spawn",
        kind: "goroutine_leak",
        reason: |_| Some("chan receive"),
        entry: "main.awaitReply",
        remedy: "ctx.Done()",
        releasable: true,
    });
}

#[test]
fn mutex_never_unlocked_is_stuck() {
    check(&Case {
        mode: "mutex",
        kind: "goroutine_stuck",
        reason: |_| Some("sync.Mutex.Lock"),
        entry: "main.lockForever",
        remedy: "Unlock",
        releasable: true,
    });
}

/// A WaitGroup whose Done never comes and that nothing can reach any more: a proven leak
/// (a WaitGroup still reachable would be an idle wait, e.g. a supervisor's).
#[test]
fn waitgroup_never_done_is_a_proven_leak() {
    check(&Case {
        mode: "wg",
        kind: "goroutine_leak",
        // go1.21 parks WaitGroup.Wait as a plain semaphore acquire.
        reason: |v| {
            Some(if go_version_at_least(v, 24) {
                "sync.WaitGroup.Wait"
            } else {
                "semacquire"
            })
        },
        entry: "main.waitForever",
        remedy: "wg.Done()",
        releasable: true,
    });
}

#[test]
fn nil_channel_receive_is_stuck() {
    check(&Case {
        mode: "nilchan",
        kind: "goroutine_stuck",
        reason: |_| Some("chan receive (nil chan)"),
        entry: "main.recvNilChan",
        remedy: "make()",
        releasable: false,
    });
}

#[test]
fn loop_that_never_exits_is_spinning() {
    check(&Case {
        mode: "spin",
        kind: "goroutine_spinning",
        reason: |_| None,
        entry: "main.spinForever",
        remedy: "exit condition",
        releasable: true,
    });
}

/// Idle worker pool, idle HTTP server, ticker, short timeouts, short-lived goroutines: silent,
/// at goroutine and at thread level (`watch` traces the process's threads too).
#[test]
fn healthy_service_is_silent() {
    require_root();
    for version in fixture_versions() {
        let fx = start_fixture(&fixture(&version, "leaky", false), &["-mode", "healthy"]);
        let mut lm = Leakmon::watch(&[fx.pid()], &[]);
        lm.wait_stderr("watching PID");
        // Several leak windows and well past both thresholds.
        let alerts = lm.collect_for(Duration::from_secs(10));
        assert!(
            alerts.is_empty(),
            "go{version}: healthy service alerted: {alerts:#?}"
        );
    }
}

/// A stripped binary (`-ldflags=-s -w`): offsets from the built-in table, sites from
/// .gopclntab, the goroutine table located from `runtime.allgadd`'s code; and the same with
/// parks traced by the `gopark` probe instead of scanned (`--probe-parks`), which must also
/// forget exited goroutines (`goexit1`) so a release resolves.
#[test]
fn stripped_binary_scanned_and_probed() {
    require_root();
    let versions = fixture_versions();
    let markers = markers();
    for version in [&versions[0], &versions[versions.len() - 1]] {
        let bin = fixture(version, "leaky", true);
        for (mode, kind, probe) in [
            ("send", "goroutine_leak", false),
            ("spin", "goroutine_spinning", false),
            ("send", "goroutine_leak", true),
        ] {
            let what = format!("{mode} on stripped go{version}, probe_parks={probe}");
            let fx = start_fixture(&bin, &["-mode", mode]);
            let extra: &[&str] = if probe { &["--probe-parks"] } else { &[] };
            let mut lm = Leakmon::watch(&[fx.pid()], extra);
            let alert = lm.expect(&format!("{kind} for {what}"), |a| {
                a["kind"] == kind && a["state"] == "firing"
            });
            assert_eq!(
                alert["created_at"]["line"], markers[mode].0,
                "{what}: {alert:#}"
            );
            if mode == "send" {
                assert_eq!(
                    alert["blocked_at"]["line"], markers[mode].1,
                    "{what}: {alert:#}"
                );
                assert_eq!(
                    alert["blocked_at"]["function"], "main.sendForever",
                    "{what}"
                );
                fx.signal(libc::SIGUSR1);
                lm.expect(&format!("{kind} resolved for {what}"), |a| {
                    a["kind"] == kind && a["state"] == "resolved"
                });
            }
            let stderr = lm.stderr();
            assert!(stderr.contains("offsets from Table"), "{what}: {stderr}");
            let how = if probe {
                "parks seen by gopark probe"
            } else {
                "parks seen by scanning runtime.allgs"
            };
            assert!(stderr.contains(how), "{what}: {stderr}");
        }
    }
}

/// Attaching and detaching, in both parking modes, leaves the program running and responsive:
/// no crash, no stall, probes removed (a leftover uprobe on a freed program would crash it).
#[test]
fn attach_and_detach_leave_the_program_healthy() {
    require_root();
    let versions = fixture_versions();
    let bin = fixture(&versions[versions.len() - 1], "leaky", false);
    let mut fx = start_fixture(&bin, &["-mode", "healthy"]);
    for round in 0..4 {
        let extra: &[&str] = if round % 2 == 1 {
            &["--probe-parks"]
        } else {
            &[]
        };
        let mut lm = Leakmon::watch(&[fx.pid()], extra);
        lm.wait_stderr("watching PID");
        std::thread::sleep(Duration::from_millis(700));
        lm.proc.signal(libc::SIGINT);
        let status = lm.proc.child.wait().unwrap();
        assert!(status.success(), "leakmon exit: {status}; {}", lm.stderr());
        assert!(lm.stderr().contains("detached"), "{}", lm.stderr());
        assert!(
            fx.child.try_wait().unwrap().is_none(),
            "the watched program died in round {round}"
        );
    }
    // Still serving its signal handler: it answers a release at once.
    fx.signal(libc::SIGUSR1);
    fx.expect_line("released");
}
