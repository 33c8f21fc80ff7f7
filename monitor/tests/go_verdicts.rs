//! Verdicts users can trust, end to end on real Go programs (fixtures/go/leaky): leaks that
//! happen once are proven by reachability (`proof: "unreachable"`) on every tested Go version,
//! stripped too; leaks on a global channel are found by growth and stay firing after growth
//! stops; healthy patterns that a weaker rule flags stay silent while the analysis runs.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod support;

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::TcpStream,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use serde_json::Value;
use support::{Leakmon, Proc, fixture, fixture_versions, markers, require_root, start_fixture};

/// One-shot leaks: (mode, what they wait on).
const ONE_SHOT: [(&str, &str); 7] = [
    ("once-send", "channel"),
    ("once-range", "channel"),
    ("once-select", "channel"),
    ("once-closure", "channel"),
    ("once-wg", "semaphore"),
    ("wg", "semaphore"),
    ("once-cond", "cond"),
];

/// Healthy patterns that must stay silent.
const HEALTHY: [&str; 8] = [
    "lifetimewg",
    "errgroup",
    "h2stream",
    "pool",
    "rwmutex",
    "tickerctx",
    "finalizer",
    "deferrec",
];

/// A fixture's 3 goroutines, all proven leaked, waiting on `kind` where its markers say.
fn assert_proven_three(
    a: &Value,
    markers: &HashMap<String, (u64, u64)>,
    mode: &str,
    kind: &str,
    w: &str,
) {
    assert_eq!(a["proof"], "unreachable", "{w}");
    // The alert says how memory was read: the runtime's own maps where it has them.
    let marking = a["marking"].as_str().unwrap_or_default();
    assert!(
        marking.starts_with("stacks by their stack maps")
            && marking.contains("globals by the runtime's pointer bitmaps"),
        "{w}: marking {marking:?}"
    );
    assert_eq!(a["proven"], 3, "{w}");
    assert_eq!(a["count"], 3, "{w}");
    assert_eq!(a["waits_on"]["kind"], kind, "{w}");
    let (create, block) = markers[mode];
    assert_eq!(a["created_at"]["line"], create, "{w}");
    assert_eq!(a["blocked_at"]["line"], block, "{w}");
}

/// Each fixture build of `leaky` the verdicts run on, named ("go1.27.3 stripped"): every
/// tested Go version, with symbols and stripped.
fn leaky_builds() -> Vec<(String, PathBuf)> {
    fixture_versions()
        .iter()
        .flat_map(|version| {
            [false, true].map(|stripped| {
                let what = format!("go{version}{}", if stripped { " stripped" } else { "" });
                (what, fixture(version, "leaky", stripped))
            })
        })
        .collect()
}

fn for_pid(pid: u32) -> impl Fn(&Value) -> bool {
    move |a: &Value| a["pid"] == pid
}

#[test]
fn one_shot_leaks_are_proven_unreachable() {
    require_root();
    let markers = markers();
    for (what, bin) in leaky_builds() {
        let procs: Vec<(&str, &str, Proc)> = ONE_SHOT
            .iter()
            .map(|(mode, kind)| (*mode, *kind, start_fixture(&bin, &["-mode", mode])))
            .collect();
        let nil = start_fixture(&bin, &["-mode", "nilchan"]);
        let mut pids: Vec<u32> = procs.iter().map(|(_, _, p)| p.pid()).collect();
        pids.push(nil.pid());
        let mut lm = Leakmon::watch(&pids, &[]);
        for (mode, kind, p) in &procs {
            let pid = p.pid();
            let first = lm.expect(&format!("leak for {mode} on {what}"), |a| {
                for_pid(pid)(a) && a["state"] == "firing"
            });
            assert_eq!(
                first["kind"], "goroutine_leak",
                "{mode} on {what}: {first:#}"
            );
            // All three proven: at once, or (a goroutine still runnable at the first
            // analyses of a loaded machine is judged a scan later) in an update.
            let a = lm.expect(&format!("3 proven for {mode} on {what}"), |a| {
                for_pid(pid)(a)
                    && a["kind"] == "goroutine_leak"
                    && (a["state"] == "firing" || a["state"] == "updated")
                    && a["proven"] == 3
            });
            assert_eq!(a["id"], first["id"], "{mode} on {what}");
            let w = format!("{mode} on {what}: {a:#}");
            assert_proven_three(&a, &markers, mode, kind, &w);
            assert!(a["id"].as_str().is_some_and(|id| id.len() == 16), "{w}");
            assert!(
                a["stack"].as_array().is_some_and(|s| s.len() >= 2),
                "{w}: the whole stack goes with the alert"
            );
            if *kind == "channel" {
                assert_eq!(a["waits_on"]["closed"], false, "{w}");
            }
        }
        // A nil channel can never be woken: stuck, proven without an analysis.
        let stuck = lm.expect(&format!("nilchan stuck on {what}"), |a| {
            for_pid(nil.pid())(a) && a["state"] == "firing"
        });
        assert_eq!(stuck["kind"], "goroutine_stuck", "{stuck:#}");
        assert_eq!(stuck["proof"], "unreachable", "{stuck:#}");
        // Released: each resolves, with the id it fired with.
        for (mode, _, p) in &procs {
            p.signal(libc::SIGUSR1);
            let pid = p.pid();
            let fired = lm.expect("fired", |a| for_pid(pid)(a) && a["state"] == "firing");
            let r = lm.expect(&format!("{mode} resolved on {what}"), |a| {
                for_pid(pid)(a) && a["state"] == "resolved"
            });
            assert_eq!(r["id"], fired["id"], "{mode} on {what}");
            assert_eq!(r["count"], 0, "{mode} on {what}");
        }
        let others: Vec<Value> = lm
            .collect_for(Duration::from_millis(500))
            .into_iter()
            .filter(|a| a["kind"] != "goroutine_leak" && a["pid"] != nil.pid())
            .collect();
        assert!(others.is_empty(), "{what}: unexpected alerts {others:#?}");
        lm.stop();
    }
}

#[test]
fn healthy_patterns_stay_silent_while_analysed() {
    require_root();
    let versions = fixture_versions();
    let mut procs: Vec<(String, Proc)> = Vec::new();
    for version in &versions {
        let bin = fixture(version, "leaky", false);
        for mode in HEALTHY {
            procs.push((
                format!("{mode} on go{version}"),
                start_fixture(&bin, &["-mode", mode]),
            ));
        }
    }
    let pids: Vec<u32> = procs.iter().map(|(_, p)| p.pid()).collect();
    let names: HashMap<u32, &str> = procs.iter().map(|(n, p)| (p.pid(), n.as_str())).collect();
    // Several thresholds: 1 s, then 3 s; the scan interval follows them (not set).
    for (threshold, seconds) in [("1s", 20), ("3s", 15)] {
        let mut args = vec!["watch".to_owned()];
        for pid in &pids {
            args.extend(["--pid".to_owned(), pid.to_string()]);
        }
        for a in ["--block-threshold", threshold, "--leak-window", "3s"] {
            args.push(a.to_owned());
        }
        args.extend(["--format".to_owned(), "json".to_owned()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut lm = Leakmon::start(&args);
        let alerts = lm.collect_for(Duration::from_secs(seconds));
        let named: Vec<String> = alerts
            .iter()
            .map(|a| {
                format!(
                    "{}: {} {} {}",
                    names
                        .get(&(a["pid"].as_u64().unwrap_or(0) as u32))
                        .unwrap_or(&"?"),
                    a["kind"],
                    a["wait_reason"],
                    a["blocked_at"]
                )
            })
            .collect();
        assert!(
            alerts.is_empty(),
            "block threshold {threshold}: healthy programs raised {named:#?}"
        );
        // The analysis ran on the programs with candidates (it is what clears them).
        let stderr = lm.stderr();
        for mode in [
            "lifetimewg",
            "errgroup",
            "h2stream",
            "finalizer",
            "deferrec",
        ] {
            let (_, p) = procs
                .iter()
                .find(|(n, _)| n.starts_with(&format!("{mode} on")))
                .unwrap();
            assert!(
                stderr.contains(&format!("PID {}: reachability analysis", p.pid())),
                "{mode}: no reachability analysis ran; stderr:\n{stderr}"
            );
        }
        lm.stop();
    }
}

#[test]
fn global_channel_leak_is_found_by_growth_and_stays_until_released() {
    require_root();
    let version = fixture_versions().pop().unwrap();
    let bin = fixture(&version, "leaky", false);
    // Growing for 8 s: found by growth (a 3 s window) while it still grows, on a loaded CI
    // machine too, then left to stand.
    let fx = start_fixture(
        &bin,
        &["-mode", "global", "-interval", "200ms", "-grow-for", "8s"],
    );
    let pid = fx.pid();
    let mut lm = Leakmon::watch(&[pid], &["--update-interval", "1s"]);
    let fired = lm.expect("global leak", |a| {
        for_pid(pid)(a) && a["kind"] == "goroutine_leak" && a["state"] == "firing"
    });
    // Reachable from a global: no proof; growth is the evidence.
    assert!(fired["proof"].is_null(), "{fired:#}");
    assert!(
        fired["growth_per_minute"].as_f64().unwrap() > 0.0,
        "{fired:#}"
    );
    // Growth stops after 8 s; the leaked goroutines stay: firing, with updates, no resolution.
    let later = lm.collect_for(Duration::from_secs(14));
    let resolved: Vec<&Value> = later.iter().filter(|a| a["state"] == "resolved").collect();
    assert!(resolved.is_empty(), "resolved while leaked: {resolved:#?}");
    let last = later
        .iter()
        .rev()
        .find(|a| a["state"] == "updated" && a["id"] == fired["id"])
        .expect("updates while firing");
    assert!(
        last["count"].as_u64().unwrap() > fired["count"].as_u64().unwrap(),
        "updates carry the live count: {last:#}"
    );
    fx.signal(libc::SIGUSR1);
    let r = lm.expect("resolved after release", |a| {
        for_pid(pid)(a) && a["state"] == "resolved"
    });
    assert_eq!(r["id"], fired["id"]);
    lm.stop();
}

/// A busy HTTP server (with idle workers that the analysis must clear) under load: no alert,
/// and the program keeps serving.
#[test]
fn busy_http_server_with_the_analysis_running_is_silent() {
    require_root();
    let version = fixture_versions().pop().unwrap();
    let bin = fixture(&version, "httpserver", false);
    let addr = "127.0.0.1:18291";
    let server = start_fixture(&bin, &["-addr", addr, "-heap", "64", "-workers", "8"]);
    let pid = server.pid();
    let mut lm = Leakmon::watch(&[pid], &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (stop, served) = (Arc::clone(&stop), Arc::clone(&served));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut s) = TcpStream::connect(addr) else {
                        continue;
                    };
                    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                    let mut body = String::new();
                    if s.read_to_string(&mut body).is_ok() && body.contains(" 200 ") {
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let alerts = lm.collect_for(Duration::from_secs(20));
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.join().unwrap();
    }
    assert!(alerts.is_empty(), "a healthy server raised {alerts:#?}");
    assert!(
        lm.stderr()
            .contains(&format!("PID {pid}: reachability analysis")),
        "no analysis ran; stderr:\n{}",
        lm.stderr()
    );
    let n = served.load(Ordering::Relaxed);
    assert!(n > 1000, "only {n} requests served in 20 s");
    lm.stop();
}

/// Locks and stack slots, as the runtime's own GC sees them (issue 20): waiters of a lock
/// held by a leaked goroutine are proven leaked, never first called stuck; a lock held by a
/// live goroutine stays `goroutine_stuck`; a channel left only in a dead stack slot of a
/// live goroutine does not keep its senders alive, one in a live slot does.
#[test]
fn locks_and_stack_slots_are_judged_as_the_runtime_sees_them() {
    require_root();
    let markers = markers();
    for (what, bin) in leaky_builds() {
        let once_mutex = start_fixture(&bin, &["-mode", "once-mutex"]);
        let dead = start_fixture(&bin, &["-mode", "deadslot"]);
        let live = start_fixture(&bin, &["-mode", "liveslot"]);
        let held = start_fixture(&bin, &["-mode", "mutex"]);
        let holding = start_fixture(&bin, &["-mode", "heldlock"]);
        let pids = [
            once_mutex.pid(),
            dead.pid(),
            live.pid(),
            held.pid(),
            holding.pid(),
        ];
        let mut lm = Leakmon::watch(&pids, &[]);
        for (p, mode, reason, kind) in [
            (&once_mutex, "once-mutex", "sync.Mutex.Lock", "lock"),
            (&dead, "deadslot", "chan send", "channel"),
        ] {
            let pid = p.pid();
            let a = lm.expect(&format!("{mode} proven on {what}"), |a| {
                for_pid(pid)(a)
                    && a["kind"] == "goroutine_leak"
                    && a["state"] == "firing"
                    && a["wait_reason"] == reason
            });
            let w = format!("{mode} on {what}: {a:#}");
            assert_proven_three(&a, &markers, mode, kind, &w);
        }
        // The holder itself leaked on its send.
        let holder = lm.expect(&format!("once-mutex holder on {what}"), |a| {
            for_pid(once_mutex.pid())(a)
                && a["kind"] == "goroutine_leak"
                && a["wait_reason"] == "chan send"
        });
        assert_eq!(holder["proven"], 1, "{what}: {holder:#}");
        // Held by the main goroutine, which lives: stuck, no proof of a leak.
        let stuck = lm.expect(&format!("mutex stuck on {what}"), |a| {
            for_pid(held.pid())(a) && a["state"] == "firing"
        });
        assert_eq!(stuck["kind"], "goroutine_stuck", "{what}: {stuck:#}");
        assert_eq!(stuck["count"], 3, "{what}: {stuck:#}");
        assert_eq!(stuck["waits_on"]["kind"], "lock", "{what}: {stuck:#}");
        assert_eq!(stuck["waits_on"]["locked"], true, "{what}: {stuck:#}");
        // Held by a goroutine whose live stack slots point to the lock: named.
        let named = lm.expect(&format!("heldlock stuck on {what}"), |a| {
            for_pid(holding.pid())(a) && a["state"] == "firing"
        });
        let w = format!("heldlock on {what}: {named:#}");
        assert_eq!(named["kind"], "goroutine_stuck", "{w}");
        assert_eq!(named["proof"], Value::Null, "{w}");
        let (create, block) = markers["heldlock"];
        assert_eq!(named["created_at"]["line"], create, "{w}");
        assert_eq!(named["blocked_at"]["line"], block, "{w}");
        assert!(
            named["waits_on"]["held_by"]
                .as_str()
                .is_some_and(|h| h.starts_with("goroutine ") && h.contains("main.holdLock")),
            "{w}"
        );
        let all = lm.collect_for(Duration::from_secs(3));
        let wrong: Vec<&Value> = all
            .iter()
            .filter(|a| {
                a["pid"] == live.pid()
                    || ((a["pid"] == held.pid() || a["pid"] == holding.pid())
                        && a["kind"] != "goroutine_stuck")
                    || ((a["pid"] == once_mutex.pid() || a["pid"] == dead.pid())
                        && a["kind"] != "goroutine_leak")
            })
            .collect();
        assert!(wrong.is_empty(), "{what}: unexpected alerts {wrong:#?}");
        // The analyses read stacks and globals as the runtime's GC does.
        let stderr = lm.stderr();
        let line = stderr
            .lines()
            .find(|l| l.contains(&format!("PID {}: reachability analysis", dead.pid())))
            .unwrap_or_else(|| panic!("{what}: no analysis logged:\n{stderr}"));
        assert!(
            line.contains("globals by the runtime's pointer bitmaps")
                && !line.contains(" 0 stacks scanned by their stack maps"),
            "{what}: {line}"
        );
        for p in [&once_mutex, &dead, &held, &holding] {
            p.signal(libc::SIGUSR1);
        }
        for p in [&once_mutex, &dead, &held, &holding] {
            let pid = p.pid();
            lm.expect(&format!("{pid} resolved on {what}"), |a| {
                for_pid(pid)(a) && a["state"] == "resolved"
            });
        }
        lm.stop();
    }
}
