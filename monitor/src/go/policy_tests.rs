//! The detector under Go's policy: which goroutine groups are leaks, stuck or spinning, and
//! which stay silent.

use std::sync::Arc;

use super::{
    GO,
    kinds::{GOROUTINE_LEAK, GOROUTINE_SPINNING, GOROUTINE_STUCK},
};
use crate::detect::{
    Alert, AlertBook, AlertState, Detector, Due, Observation, Site, Snapshot, TaskState, Thresholds,
};

const S: u64 = 1_000_000_000;

fn thresholds() -> Thresholds {
    Thresholds::for_tests()
}

fn site(function: &str, line: u32) -> Option<Arc<Site>> {
    Some(Arc::new(Site {
        function: function.into(),
        file: "/src/app/main.go".into(),
        line,
    }))
}

fn parked(goid: u64, since: u64, reason: &str, line: u32) -> Observation {
    Observation {
        id: goid,
        state: TaskState::Parked {
            since_ns: since * S,
            wait_reason: reason.into(),
            blocked_at: site("main.worker", line),
        },
        created_at: site("main.main", 10),
        entry: "main.worker".into(),
        waits_on: None,
        proven: false,
        stack: None,
        thread: None,
    }
}

/// What a source would hand the detector at `now`: the goroutines `Due` admits.
fn snapshot(now: u64, goroutines: Vec<Observation>) -> Snapshot {
    let due = Due {
        now_ns: now * S,
        thresholds: thresholds(),
    };
    Snapshot {
        now_ns: now * S,
        tasks: goroutines
            .into_iter()
            .filter(|o| due.admits(&GO, o))
            .collect(),
        policy: &GO,
        marking: Some("stacks by their stack maps".into()),
    }
}

/// One goroutine leaks per second on a channel send from t=0.
fn send_leak_until(now: u64) -> Vec<Observation> {
    (0..=now).map(|i| parked(i, i, "chan send", 42)).collect()
}

#[test]
fn growing_send_group_fires_a_leak_once_then_resolves_on_release() {
    let mut d = Detector::new(thresholds());
    let mut fired = Vec::new();
    for now in 0..=12 {
        fired.extend(d.observe(1, &snapshot(now, send_leak_until(now))));
    }
    assert_eq!(fired.len(), 1, "{fired:?}");
    let t = &fired[0];
    assert_eq!(t.state, AlertState::Firing);
    assert_eq!(t.alert.kind, &GOROUTINE_LEAK);
    assert_eq!(t.alert.group.wait_reason.as_deref(), Some("chan send"));
    assert_eq!(t.alert.group.blocked_at.as_ref().map(|s| s.line), Some(42));
    let resolved = d.observe(1, &snapshot(13, Vec::new()));
    assert_eq!(resolved.len(), 1);
    assert_eq!(resolved[0].state, AlertState::Resolved);
    assert_eq!(resolved[0].alert.count, 0);
}

#[test]
fn fixed_idle_pool_is_silent() {
    let mut d = Detector::new(thresholds());
    for now in 0..=30 {
        let pool = (0..8).map(|i| parked(i, 0, "chan receive", 7)).collect();
        assert!(d.observe(1, &snapshot(now, pool)).is_empty(), "t={now}");
    }
}

#[test]
fn short_waits_are_silent() {
    let mut d = Detector::new(thresholds());
    for now in 0..=30 {
        // Fresh short waits every second, each lasting under the block threshold.
        let g = (0..=now)
            .map(|i| parked(i, now, "sync.Mutex.Lock", 9))
            .collect();
        assert!(d.observe(1, &snapshot(now, g)).is_empty(), "t={now}");
    }
}

#[test]
fn mutex_waiters_past_threshold_are_stuck_and_resolve() {
    let mut d = Detector::new(thresholds());
    let waiters = || (0..3).map(|i| parked(i, 0, "sync.Mutex.Lock", 9)).collect();
    assert!(d.observe(1, &snapshot(1, waiters())).is_empty());
    let fired = d.observe(1, &snapshot(3, waiters()));
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0].alert.kind, &GOROUTINE_STUCK);
    assert_eq!(fired[0].alert.count, 3);
    assert!((fired[0].alert.oldest_seconds - 3.0).abs() < 1e-6);
    assert!(d.observe(1, &snapshot(4, waiters())).is_empty());
    let resolved = d.observe(1, &snapshot(5, Vec::new()));
    assert_eq!(resolved[0].state, AlertState::Resolved);
}

#[test]
fn spinning_needs_reschedules_and_recent_runs() {
    let mut d = Detector::new(thresholds());
    let running = |runs, last| Observation {
        id: 1,
        state: TaskState::Running {
            since_ns: 0,
            runs,
            last_run_ns: last * S,
        },
        created_at: site("main.main", 12),
        entry: "main.spin".into(),
        waits_on: None,
        proven: false,
        stack: None,
        thread: None,
    };
    // A goroutine in one long system call: one run, long ago.
    assert!(d.observe(1, &snapshot(10, vec![running(1, 0)])).is_empty());
    let fired = d.observe(1, &snapshot(11, vec![running(900, 11)]));
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0].alert.kind, &GOROUTINE_SPINNING);
    assert_eq!(fired[0].alert.group.blocked_at, None);
}

#[test]
fn runtime_goroutines_are_never_reported() {
    let mut d = Detector::new(thresholds());
    let gc = |i| Observation {
        entry: "runtime.gcBgMarkWorker".into(),
        ..parked(i, 0, "sync.Mutex.Lock", 1)
    };
    for now in 0..=20 {
        let g = (0..=now).map(gc).collect();
        assert!(d.observe(1, &snapshot(now, g)).is_empty());
    }
}

#[test]
fn main_goroutine_lock_and_spin_are_reported_idle_waits_are_not() {
    let main = |reason: &str| Observation {
        entry: "runtime.main".into(),
        ..parked(1, 0, reason, 5)
    };
    let mut d = Detector::new(thresholds());
    assert!(
        d.observe(1, &snapshot(10, vec![main("select (no cases)")]))
            .is_empty()
    );
    assert!(
        d.observe(1, &snapshot(11, vec![main("sync.WaitGroup.Wait")]))
            .is_empty()
    );
    let fired = d.observe(1, &snapshot(12, vec![main("sync.Mutex.Lock")]));
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0].alert.kind, &GOROUTINE_STUCK);
    let spinning_main = Observation {
        id: 1,
        state: TaskState::Running {
            since_ns: 0,
            runs: 500,
            last_run_ns: 20 * S,
        },
        created_at: None,
        entry: "runtime.main".into(),
        waits_on: None,
        proven: false,
        stack: None,
        thread: None,
    };
    let fired = d.observe(2, &snapshot(20, vec![spinning_main]));
    assert_eq!(fired[0].alert.kind, &GOROUTINE_SPINNING);
}

fn proven(o: Observation) -> Observation {
    Observation { proven: true, ..o }
}

#[test]
fn a_proven_leak_fires_whatever_its_size_and_stays_until_released() {
    let mut d = Detector::new(thresholds());
    let leaked = |proof: bool| -> Vec<Observation> {
        (0..2)
            .map(|i| parked(i, 0, "sync.WaitGroup.Wait", 9))
            .map(|o| if proof { proven(o) } else { o })
            .collect()
    };
    // A fixed WaitGroup wait is not stuck: silent until proven.
    for now in 3..6 {
        assert!(d.observe(1, &snapshot(now, leaked(false))).is_empty());
    }
    let fired = d.observe(1, &snapshot(6, leaked(true)));
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0].alert.kind, &GOROUTINE_LEAK);
    assert_eq!(fired[0].alert.proof.map(|p| p.name), Some("unreachable"));
    assert_eq!(fired[0].alert.proven, 2);
    // Proof lost for a scan (a torn read): still the same goroutines, still firing.
    for now in 7..30 {
        let t = d.observe(1, &snapshot(now, leaked(now % 2 == 0)));
        assert!(t.iter().all(|t| t.state == AlertState::Updated), "{t:?}");
    }
    let resolved = d.observe(1, &snapshot(30, Vec::new()));
    assert_eq!(resolved[0].state, AlertState::Resolved);
}

#[test]
fn a_leak_that_stops_growing_stays_firing_until_released() {
    let mut d = Detector::new(thresholds());
    let mut fired = Vec::new();
    for now in 0..=12 {
        fired.extend(d.observe(1, &snapshot(now, send_leak_until(now))));
    }
    assert_eq!(fired.len(), 1);
    let id = fired[0].id.clone();
    // Growth stops at 13 goroutines; they all stay parked.
    let mut later = Vec::new();
    for now in 13..=40 {
        later.extend(d.observe(1, &snapshot(now, send_leak_until(12))));
    }
    assert!(
        later
            .iter()
            .all(|t| t.state == AlertState::Updated && t.id == id),
        "{later:?}"
    );
    let resolved = d.observe(1, &snapshot(41, Vec::new()));
    assert_eq!(resolved.len(), 1);
    assert_eq!(resolved[0].state, AlertState::Resolved);
}

#[test]
fn a_pool_whose_members_come_and_go_is_not_a_leak() {
    let mut d = Detector::new(thresholds());
    // 8 workers; the number parked past the threshold grows 2, 4, 6, 8 then one wakes
    // and re-parks each second (a new wait each time), so the count keeps moving up.
    for now in 0..=40u64 {
        let pool: Vec<Observation> = (0..8u64)
            .filter(|i| *i < (now / 3 + 2).min(8))
            .map(|i| {
                let since = if i == now % 8 { now } else { i };
                parked(i, since.saturating_sub(3), "chan receive", 7)
            })
            .collect();
        let t = d.observe(1, &snapshot(now, pool));
        assert!(t.is_empty(), "t={now}: {t:?}");
    }
}

#[test]
fn a_stuck_group_that_becomes_a_leak_changes_kind_once() {
    let mut d = Detector::new(thresholds());
    let mutex = |n: u64| -> Vec<Observation> {
        (0..n)
            .map(|i| Observation {
                entry: "main.worker".into(),
                ..parked(i, i, "chan send", 9)
            })
            .collect()
    };
    // Fixed count, idle class: silent; then proven: a leak.
    assert!(d.observe(1, &snapshot(5, mutex(2))).is_empty());
    let p: Vec<Observation> = mutex(2).into_iter().map(proven).collect();
    let fired = d.observe(1, &snapshot(6, p.clone()));
    assert_eq!(fired[0].state, AlertState::Firing);
    // Locks: stuck then, for the same group key, never a resolution in between.
    let mut b = AlertBook::new(std::time::Duration::from_secs(60));
    let a = fired[0].alert.clone();
    let stuck = Alert {
        kind: &GOROUTINE_STUCK,
        ..a.clone()
    };
    assert_eq!(
        b.settle(1, 0, vec![(1, stuck)])[0].state,
        AlertState::Firing
    );
    let t = b.settle(1, S, vec![(1, a)]);
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].state, AlertState::Changed);
    assert_eq!(t[0].previous, Some(&GOROUTINE_STUCK));
}

#[test]
fn forgetting_a_process_resolves_its_alerts() {
    let mut d = Detector::new(thresholds());
    let waiters = (0..3).map(|i| parked(i, 0, "sync.Mutex.Lock", 9)).collect();
    assert_eq!(d.observe(7, &snapshot(5, waiters)).len(), 1);
    let resolved = d.forget(7);
    assert_eq!(resolved.len(), 1);
    assert_eq!(resolved[0].state, AlertState::Resolved);
    assert!(d.forget(7).is_empty());
}
