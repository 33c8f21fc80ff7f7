//! End to end: real C and Rust programs (fixtures/native, built at test time) watched by
//! leakmon's thread probes. A lock cycle is a `thread_deadlock` naming both threads, their
//! locks and owners; Rust std's owner-less mutex is `thread_stuck`; threads started and left
//! blocked are a `thread_leak`; a healthy condition-variable pool, sleepers and timed waits,
//! a tokio service at rest (and a healthy Go service) raise nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{
    Leakmon, block_line, fixture, fixture_versions, native_fixture, require_root, start_fixture,
};

fn is_thread_alert(a: &Value) -> bool {
    let kind = a["kind"].as_str().unwrap_or_default();
    kind.starts_with("thread_") || kind == "process_hung"
}

fn thread_named<'a>(alert: &'a Value, name: &str) -> &'a Value {
    alert["threads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("no thread {name} in {alert:#}"))
}

#[test]
fn c_lock_cycle_is_a_deadlock_naming_both_threads() {
    require_root();
    let bin = native_fixture("threads");
    let fx = start_fixture(&bin, &["deadlock"]);
    let pid = fx.pid();
    let mut lm = Leakmon::watch(&[pid], &[]);
    let alert = lm.expect("thread_deadlock firing", |a| {
        a["kind"] == "thread_deadlock" && a["state"] == "firing"
    });
    assert_eq!(alert["pid"], pid, "{alert:#}");
    assert_eq!(alert["runtime"], "native", "{alert:#}");
    assert_eq!(alert["exe"].as_str(), Some(bin.to_str().unwrap()));
    assert_eq!(alert["count"], 2, "{alert:#}");
    assert_eq!(alert["wait_reason"], "pthread mutex", "{alert:#}");
    let a = thread_named(&alert, "locker-a");
    let b = thread_named(&alert, "locker-b");
    // Each waits on the lock the other holds.
    assert_eq!(a["owner_tid"], b["tid"], "{alert:#}");
    assert_eq!(b["owner_tid"], a["tid"], "{alert:#}");
    assert_ne!(a["waits_on"], b["waits_on"], "{alert:#}");
    assert!(a["waits_on"].as_str().unwrap().starts_with("0x"));
    for (t, tag, function) in [(a, "deadlock-a", "locker_a"), (b, "deadlock-b", "locker_b")] {
        let site = &t["blocked_at"];
        assert_eq!(site["function"], function, "{alert:#}");
        assert!(
            site["file"]
                .as_str()
                .unwrap()
                .ends_with("fixtures/native/threads.c"),
            "{alert:#}"
        );
        assert_eq!(
            site["line"],
            block_line("fixtures/native/threads.c", tag),
            "{alert:#}"
        );
        assert!(t["waited_seconds"].as_f64().unwrap() > 0.0);
        let stack: Vec<&str> = t["stack"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            stack.iter().any(|f| f.contains("pthread_mutex_lock")),
            "{stack:#?}"
        );
        assert!(stack.iter().any(|f| f.starts_with(function)), "{stack:#?}");
    }
    assert!(
        alert["hint"].as_str().unwrap().contains("order"),
        "{alert:#}"
    );
    // The main thread joins the deadlocked ones: the whole process is hung.
    lm.expect("process_hung firing", |a| {
        a["kind"] == "process_hung" && a["state"] == "firing"
    });
    drop(fx);
    lm.expect("thread_deadlock resolved", |a| {
        a["kind"] == "thread_deadlock" && a["state"] == "resolved"
    });
}

#[test]
fn rust_std_mutex_cycle_is_stuck_not_deadlock() {
    require_root();
    let fx = start_fixture(&native_fixture("deadlock"), &[]);
    let mut lm = Leakmon::watch(&[fx.pid()], &[]);
    let alert = lm.expect("thread_stuck firing", |a| {
        a["kind"] == "thread_stuck" && a["state"] == "firing"
    });
    // Both threads block on the same line; std's mutex records no owner.
    assert_eq!(alert["count"], 2, "{alert:#}");
    assert_eq!(alert["wait_reason"], "lock", "{alert:#}");
    let site = &alert["blocked_at"];
    assert!(
        site["file"]
            .as_str()
            .unwrap()
            .ends_with("fixtures/native/deadlock.rs"),
        "{alert:#}"
    );
    assert_eq!(
        site["line"],
        block_line("fixtures/native/deadlock.rs", "rust"),
        "{alert:#}"
    );
    for name in ["rust-a", "rust-b"] {
        assert!(
            thread_named(&alert, name)["owner_tid"].is_null(),
            "{alert:#}"
        );
    }
    let alerts = lm.collect_for(Duration::from_secs(3));
    assert!(
        !alerts.iter().any(|a| a["kind"] == "thread_deadlock"),
        "an owner-less lock cannot be proven a cycle: {alerts:#?}"
    );
}

#[test]
fn threads_left_blocked_are_a_leak() {
    require_root();
    let fx = start_fixture(&native_fixture("threads"), &["leak"]);
    let mut lm = Leakmon::watch(&[fx.pid()], &[]);
    let alert = lm.expect("thread_leak firing", |a| {
        a["kind"] == "thread_leak" && a["state"] == "firing"
    });
    assert!(alert["count"].as_u64().unwrap() >= 3, "{alert:#}");
    assert!(
        alert["growth_per_minute"].as_f64().unwrap() > 0.0,
        "{alert:#}"
    );
    assert_eq!(alert["entry"]["function"], "leaked", "{alert:#}");
    assert_eq!(
        alert["blocked_at"]["line"],
        block_line("fixtures/native/threads.c", "leak"),
        "{alert:#}"
    );
    assert!(
        alert["threads"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["name"] == "leaked")
    );
    assert!(
        alert["hint"].as_str().unwrap().contains("pool"),
        "{alert:#}"
    );
    // Never a lock: not stuck, not hung.
    let alerts = lm.collect_for(Duration::from_secs(2));
    assert!(
        !alerts
            .iter()
            .any(|a| a["kind"] == "thread_stuck" || a["kind"] == "process_hung"),
        "{alerts:#?}"
    );
}

/// Workers idle on a condition variable, a sleeper, a timed wait, a main thread in poll.
#[test]
fn healthy_thread_pool_is_silent() {
    require_root();
    let fx = start_fixture(&native_fixture("threads"), &["pool"]);
    let mut lm = Leakmon::watch(&[fx.pid()], &[]);
    lm.wait_stderr("tracing the threads of 1 process");
    // Several leak windows, well past the block threshold.
    let alerts = lm.collect_for(Duration::from_secs(8));
    assert!(alerts.is_empty(), "healthy pool alerted: {alerts:#?}");
}

/// A tokio service at rest: workers parked on condition variables or in epoll, an accept
/// loop, a ticker, an idle blocking-pool thread. Nothing at the thread level.
#[test]
fn tokio_service_at_rest_is_silent() {
    require_root();
    let fx = start_fixture(&native_fixture("tokio-idle"), &[]);
    let mut lm = Leakmon::watch(&[fx.pid()], &[]);
    lm.wait_stderr("tracing the threads of 1 process");
    let alerts = lm.collect_for(Duration::from_secs(8));
    assert!(alerts.is_empty(), "tokio at rest alerted: {alerts:#?}");
}

/// The Go runtime parks idle threads on futexes while goroutines block: goroutines stuck on
/// a sync.Mutex are a goroutine alert, never a thread one. (The healthy Go service test in
/// go_alerts.rs runs with the thread probes too, and must stay silent.)
#[test]
fn stuck_goroutines_are_not_stuck_threads() {
    require_root();
    let version = &fixture_versions()[0];
    let fx = start_fixture(&fixture(version, "leaky", false), &["-mode", "mutex"]);
    let mut lm = Leakmon::watch(&[fx.pid()], &[]);
    lm.wait_stderr("tracing the threads of 1 process");
    // The goroutines are stuck (a goroutine alert), the threads are not.
    lm.expect("goroutine_stuck", |a| a["kind"] == "goroutine_stuck");
    let alerts = lm.collect_for(Duration::from_secs(5));
    let threads: Vec<&Value> = alerts.iter().filter(|a| is_thread_alert(a)).collect();
    assert!(
        threads.is_empty(),
        "go{version}: thread alerts: {threads:#?}"
    );
}

/// `leakmon run` judges the threads of every process, found without being named.
#[test]
fn daemon_finds_a_deadlock_anywhere() {
    require_root();
    let fx = start_fixture(&native_fixture("threads"), &["deadlock"]);
    let pid = fx.pid();
    let mut args = vec!["run"];
    args.extend(support::FAST);
    let mut lm = Leakmon::start(&args);
    let alert = lm.expect("thread_deadlock for the fixture", |a| {
        a["kind"] == "thread_deadlock" && a["pid"] == pid
    });
    assert_eq!(alert["count"], 2, "{alert:#}");
}
