//! Alert state per process: which alerts fire, and the transitions to report.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use super::{
    Snapshot,
    groups::{GroupKey, Members, blocked_groups, running_groups},
    rules::{History, Thresholds, WaitClass, classify_wait},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// A group of blocked goroutines that keeps growing.
    GoroutineLeak,
    /// Goroutines blocked past the threshold on something that is not an idle wait.
    GoroutineStuck,
    /// Goroutines running past the spin threshold without ever parking.
    GoroutineSpinning,
    /// Threads waiting on each other's locks in a cycle.
    ThreadDeadlock,
    /// Threads blocked on a lock past the threshold.
    ThreadStuck,
    /// Blocked threads piling up while the process's thread count keeps growing.
    ThreadLeak,
    /// Every thread of the process blocked past the threshold, at least one on a lock.
    ProcessHung,
}

impl AlertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::GoroutineLeak => "goroutine_leak",
            Self::GoroutineStuck => "goroutine_stuck",
            Self::GoroutineSpinning => "goroutine_spinning",
            Self::ThreadDeadlock => "thread_deadlock",
            Self::ThreadStuck => "thread_stuck",
            Self::ThreadLeak => "thread_leak",
            Self::ProcessHung => "process_hung",
        }
    }

    /// Whether the alert is about OS threads rather than goroutines.
    pub fn is_thread(self) -> bool {
        matches!(
            self,
            Self::ThreadDeadlock | Self::ThreadStuck | Self::ThreadLeak | Self::ProcessHung
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertState {
    Firing,
    Resolved,
}

/// An alert's content at a transition.
#[derive(Clone, Debug, PartialEq)]
pub struct Alert {
    pub kind: AlertKind,
    pub group: GroupKey,
    pub count: u64,
    pub oldest_seconds: f64,
    /// Net growth per minute over the leak window (None until the window is covered).
    pub growth_per_minute: Option<f64>,
    /// Thread alerts: the threads involved (at most a few; `count` has the total).
    pub threads: Vec<super::ThreadReport>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    pub state: AlertState,
    pub alert: Alert,
}

#[derive(Debug, Default)]
struct ProcessState {
    histories: HashMap<GroupKey, History>,
    firing: BTreeMap<GroupKey, AlertKind>,
    /// Last content of each firing alert, for the resolved message.
    last: HashMap<GroupKey, Alert>,
}

/// Judges snapshots of each process against the thresholds.
#[derive(Debug)]
pub struct Detector {
    thresholds: Thresholds,
    processes: HashMap<u32, ProcessState>,
}

impl Detector {
    pub fn new(thresholds: Thresholds) -> Self {
        Self {
            thresholds,
            processes: HashMap::new(),
        }
    }

    /// Takes one snapshot of `pid` and returns the alerts that started or ended.
    pub fn observe(&mut self, pid: u32, snapshot: &Snapshot) -> Vec<Transition> {
        let t = self.thresholds;
        let now = snapshot.now_ns;
        let ns = |d: std::time::Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let state = self.processes.entry(pid).or_default();

        let blocked = blocked_groups(&snapshot.goroutines, now, ns(t.block));
        let running = running_groups(
            &snapshot.goroutines,
            now,
            ns(t.spin),
            ns(t.scan_interval).max(1_000_000_000) * 2,
        );

        // Every group with history gets a sample, 0 when it emptied, so growth and release
        // are both seen.
        for (key, members) in &blocked {
            state
                .histories
                .entry(key.clone())
                .or_default()
                .push(now, members.count, t.leak_window);
        }
        for (key, history) in state.histories.iter_mut() {
            if !blocked.contains_key(key) {
                history.push(now, 0, t.leak_window);
            }
        }

        let mut wanted: BTreeMap<GroupKey, (AlertKind, &Members)> = BTreeMap::new();
        for (key, members) in &blocked {
            let reason = key.wait_reason.as_deref().unwrap_or_default();
            let class = classify_wait(reason);
            if class == WaitClass::Runtime || is_runtime_goroutine(&key.entry) {
                continue;
            }
            // main() may wait for its whole life (select{}, wg.Wait() on lifetime workers);
            // only a lock it never gets is a finding there.
            if is_main_goroutine(&key.entry) && !is_lock_wait(reason) {
                continue;
            }
            let Some(history) = state.histories.get(key) else {
                continue;
            };
            let leaking = if state.firing.get(key) == Some(&AlertKind::GoroutineLeak) {
                // Clears when the group stops growing (or empties).
                history
                    .growth(now, t.leak_window)
                    .is_none_or(|growth| growth > 0)
            } else {
                history.keeps_growing(now, t.leak_window, t.leak_min_growth)
            };
            if leaking {
                wanted.insert(key.clone(), (AlertKind::GoroutineLeak, members));
            } else if class == WaitClass::Stuck {
                wanted.insert(key.clone(), (AlertKind::GoroutineStuck, members));
            }
        }
        for (key, members) in &running {
            if !is_runtime_goroutine(&key.entry) {
                wanted.insert(key.clone(), (AlertKind::GoroutineSpinning, members));
            }
        }

        let mut transitions = Vec::new();
        // Resolve what no longer holds (or changed kind) before firing the new.
        let firing: Vec<(GroupKey, AlertKind)> =
            state.firing.iter().map(|(k, v)| (k.clone(), *v)).collect();
        for (key, kind) in firing {
            if wanted.get(&key).map(|(k, _)| *k) != Some(kind) {
                state.firing.remove(&key);
                if let Some(mut alert) = state.last.remove(&key) {
                    if let Some(members) = blocked.get(&key).or_else(|| running.get(&key)) {
                        alert.count = members.count;
                    } else {
                        alert.count = 0;
                    }
                    transitions.push(Transition {
                        state: AlertState::Resolved,
                        alert,
                    });
                }
            }
        }
        for (key, (kind, members)) in wanted {
            let growth_per_minute = state.histories.get(&key).and_then(|h| {
                h.growth(now, t.leak_window)
                    .map(|g| g as f64 * 60.0 / t.leak_window.as_secs_f64().max(1e-9))
            });
            let alert = Alert {
                kind,
                group: key.clone(),
                count: members.count,
                oldest_seconds: now.saturating_sub(members.oldest_since_ns) as f64 / 1e9,
                growth_per_minute,
                threads: Vec::new(),
            };
            if state.firing.insert(key.clone(), kind).is_none() {
                transitions.push(Transition {
                    state: AlertState::Firing,
                    alert: alert.clone(),
                });
            }
            state.last.insert(key, alert);
        }

        // Forget groups that have been empty for a whole window and fire nothing.
        let firing = &state.firing;
        state
            .histories
            .retain(|key, h| firing.contains_key(key) || !h.is_idle());
        transitions
    }

    /// Every alert firing now, with its process, as of the last scan.
    pub fn firing(&self) -> impl Iterator<Item = (u32, &Alert)> {
        self.processes.iter().flat_map(|(pid, s)| {
            s.firing
                .keys()
                .filter_map(|key| s.last.get(key))
                .map(move |alert| (*pid, alert))
        })
    }

    /// The process is gone: resolve its alerts and drop its state.
    pub fn forget(&mut self, pid: u32) -> Vec<Transition> {
        let Some(mut state) = self.processes.remove(&pid) else {
            return Vec::new();
        };
        state
            .firing
            .keys()
            .filter_map(|key| state.last.remove(key))
            .map(|mut alert| {
                alert.count = 0;
                Transition {
                    state: AlertState::Resolved,
                    alert,
                }
            })
            .collect()
    }
}

/// The runtime's own goroutines (GC workers, sweeper, finalizers, ...); not the main
/// goroutine, whose entry is `runtime.main` but which runs the program's `main`.
fn is_runtime_goroutine(entry: &str) -> bool {
    entry.starts_with("runtime.") && !is_main_goroutine(entry)
}

fn is_main_goroutine(entry: &str) -> bool {
    entry == "runtime.main"
}

fn is_lock_wait(reason: &str) -> bool {
    matches!(
        reason,
        "sync.Mutex.Lock" | "sync.RWMutex.Lock" | "sync.RWMutex.RLock"
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::detect::{Observation, Site, TaskState};

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
            goid,
            state: TaskState::Parked {
                since_ns: since * S,
                wait_reason: reason.into(),
                blocked_at: site("main.worker", line),
            },
            created_at: site("main.main", 10),
            entry: "main.worker".into(),
        }
    }

    fn snapshot(now: u64, goroutines: Vec<Observation>) -> Snapshot {
        Snapshot {
            now_ns: now * S,
            goroutines,
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
        assert_eq!(t.alert.kind, AlertKind::GoroutineLeak);
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
        assert_eq!(fired[0].alert.kind, AlertKind::GoroutineStuck);
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
            goid: 1,
            state: TaskState::Running {
                since_ns: 0,
                runs,
                last_run_ns: last * S,
            },
            created_at: site("main.main", 12),
            entry: "main.spin".into(),
        };
        // A goroutine in one long system call: one run, long ago.
        assert!(d.observe(1, &snapshot(10, vec![running(1, 0)])).is_empty());
        let fired = d.observe(1, &snapshot(11, vec![running(900, 11)]));
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].alert.kind, AlertKind::GoroutineSpinning);
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
        assert_eq!(fired[0].alert.kind, AlertKind::GoroutineStuck);
        let spinning_main = Observation {
            goid: 1,
            state: TaskState::Running {
                since_ns: 0,
                runs: 500,
                last_run_ns: 20 * S,
            },
            created_at: None,
            entry: "runtime.main".into(),
        };
        let fired = d.observe(2, &snapshot(20, vec![spinning_main]));
        assert_eq!(fired[0].alert.kind, AlertKind::GoroutineSpinning);
    }

    #[test]
    fn forgetting_a_process_resolves_its_alerts() {
        let mut d = Detector::new(thresholds());
        let waiters = (0..3)
            .map(|i| parked(i, 0, "sync.WaitGroup.Wait", 9))
            .collect();
        assert_eq!(d.observe(7, &snapshot(5, waiters)).len(), 1);
        let resolved = d.forget(7);
        assert_eq!(resolved.len(), 1);
        assert_eq!(resolved[0].state, AlertState::Resolved);
        assert!(d.forget(7).is_empty());
    }
}
