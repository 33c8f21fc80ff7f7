//! Alert state per process: which alerts fire, and the transitions to report.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
};

use serde::Serialize;

use super::{
    Snapshot,
    book::AlertBook,
    groups::{GroupKey, Stack, WaitsOn, blocked_groups, running_groups},
    policy::Finding,
    rules::{History, Thresholds, WaitClass},
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
    /// A group of idle tokio tasks of one future type that only grows.
    TaskLeak,
    /// Idle tokio tasks that nothing can wake any more (no waker left, not notified).
    TaskLostWaker,
    /// A tokio poll that has been blocking its worker thread past the poll threshold.
    TaskBlocking,
    /// A tokio task polled over and over past the spin threshold, never waiting, its future
    /// unchanged.
    TaskSpinning,
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
            Self::TaskLeak => "task_leak",
            Self::TaskLostWaker => "task_lost_waker",
            Self::TaskBlocking => "task_blocking",
            Self::TaskSpinning => "task_spinning",
        }
    }

    /// What the alert counts, plural: goroutines, tasks or threads.
    pub fn members(self) -> &'static str {
        match self {
            Self::GoroutineLeak | Self::GoroutineStuck | Self::GoroutineSpinning => "goroutines",
            Self::TaskLeak | Self::TaskLostWaker | Self::TaskBlocking | Self::TaskSpinning => {
                "tasks"
            }
            Self::ThreadDeadlock | Self::ThreadStuck | Self::ThreadLeak | Self::ProcessHung => {
                "threads"
            }
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
    /// Still firing; its count, age or growth moved.
    Updated,
    /// Still firing, as another kind (`Transition::previous` says which).
    Changed,
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
    /// How the leak is known: `unreachable` when nothing live can reach what the goroutines
    /// wait on (two analyses agreeing); `None` when judged by growth or by age.
    pub proof: Option<&'static str>,
    /// Members proven leaked.
    pub proven: u64,
    /// What the group waits on.
    pub waits_on: Option<Arc<WaitsOn>>,
    /// The full stack of one member, innermost first.
    pub stack: Option<Stack>,
    /// Thread alerts: the threads involved (at most a few; `count` has the total).
    pub threads: Vec<super::ThreadReport>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    /// Stable for the alert's life (and its group's).
    pub id: Arc<str>,
    pub state: AlertState,
    /// For `Changed`: the kind it was.
    pub previous: Option<AlertKind>,
    pub alert: Alert,
}

/// What the detector remembers of a blocked group between scans.
#[derive(Debug, Default)]
struct GroupState {
    history: History,
    /// Members at the last scan: goid -> start of its wait.
    members: HashMap<u64, u64>,
    /// When members left (woke, or parked again elsewhere) within the leak window: a group
    /// whose members come and go is a pool, not a leak.
    departures: VecDeque<u64>,
    /// Members judged leaked: the leak holds while any of them is still parked here.
    leaked: HashSet<u64>,
}

#[derive(Debug, Default)]
struct ProcessState {
    groups: HashMap<GroupKey, GroupState>,
}

/// Judges snapshots of each process against the thresholds.
#[derive(Debug)]
pub struct Detector {
    thresholds: Thresholds,
    processes: HashMap<u32, ProcessState>,
    book: AlertBook<GroupKey>,
}

impl Detector {
    pub fn new(thresholds: Thresholds) -> Self {
        Self {
            thresholds,
            processes: HashMap::new(),
            book: AlertBook::new(thresholds.update_interval),
        }
    }

    /// Takes one snapshot of `pid` and returns the alerts that started, changed or ended.
    pub fn observe(&mut self, pid: u32, snapshot: &Snapshot) -> Vec<Transition> {
        let t = self.thresholds;
        let now = snapshot.now_ns;
        let ns = |d: std::time::Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let window = ns(t.leak_window);
        let policy = snapshot.policy;
        let state = self.processes.entry(pid).or_default();

        let blocked = blocked_groups(&snapshot.goroutines, now, ns(t.block));
        let running = running_groups(
            &snapshot.goroutines,
            now,
            |runs| {
                policy
                    .running(&t, runs)
                    .map(|(kind, after)| (kind, ns(after)))
            },
            ns(t.scan_interval).max(1_000_000_000) * 2,
        );

        // Every group with history gets a sample, 0 when it emptied, so growth and release
        // are both seen; members that left are departures.
        for (key, group) in state.groups.iter_mut() {
            let now_members: HashMap<u64, u64> = blocked
                .get(key)
                .map(|m| m.ids.iter().map(|(g, since, _)| (*g, *since)).collect())
                .unwrap_or_default();
            let left = group
                .members
                .iter()
                .filter(|(g, since)| now_members.get(g) != Some(since))
                .count();
            group.departures.extend(std::iter::repeat_n(now, left));
            while group
                .departures
                .front()
                .is_some_and(|d| now.saturating_sub(*d) > window)
            {
                group.departures.pop_front();
            }
            group.leaked.retain(|g| now_members.contains_key(g));
            group.members = now_members;
            if !blocked.contains_key(key) {
                group.history.push(now, 0, t.leak_window);
            }
        }
        for (key, members) in &blocked {
            let group = state.groups.entry(key.clone()).or_default();
            group.history.push(now, members.count, t.leak_window);
            if group.members.is_empty() {
                group.members = members.ids.iter().map(|(g, s, _)| (*g, *s)).collect();
            }
        }

        let mut holds: Vec<(GroupKey, Alert)> = Vec::new();
        for (key, members) in &blocked {
            let reason = key.wait_reason.as_deref().unwrap_or_default();
            let class = policy.classify(reason);
            if class == WaitClass::Runtime || policy.is_runtime_task(&key.entry) {
                continue;
            }
            // main() may wait for its whole life (select{}, wg.Wait() on lifetime workers);
            // only a lock it never gets is a finding there.
            if policy.is_main_task(&key.entry) && !policy.is_lock_wait(reason) {
                continue;
            }
            let Some(group) = state.groups.get_mut(key) else {
                continue;
            };
            let proven = members.ids.iter().filter(|(_, _, p)| *p).count() as u64;
            // A leak is a set that only grows: new members keep joining while the ones
            // already parked stay (none left within the window).
            let grows = class == WaitClass::Idle
                && group.departures.is_empty()
                && group
                    .history
                    .keeps_growing(now, t.leak_window, t.leak_min_growth);
            // Judged leaking now, or still leaking while goroutines judged leaked remain:
            // those joining the same place since are counted with them.
            if grows || proven > 0 || !group.leaked.is_empty() {
                group.leaked.extend(members.ids.iter().map(|(g, _, _)| *g));
            }
            let kind = if !group.leaked.is_empty() && class != WaitClass::Stuck {
                policy.kind(Finding::Leak)
            } else if class == WaitClass::Stuck {
                policy.kind(Finding::Stuck)
            } else {
                continue;
            };
            // What nothing can ever wake needs no analysis to be proven.
            let (proof, proven) = if let Some(proof) = policy.never_woken(reason) {
                (Some(proof), members.count)
            } else {
                ((proven > 0).then_some("unreachable"), proven)
            };
            let growth_per_minute = group
                .history
                .growth(now, t.leak_window)
                .map(|g| g as f64 * 60.0 / t.leak_window.as_secs_f64().max(1e-9));
            let waits_on = members.waits_on.as_ref().map(|w| {
                let mut w = WaitsOn::clone(w);
                w.objects = members.objects.len() as u64;
                Arc::new(w)
            });
            holds.push((
                key.clone(),
                Alert {
                    kind,
                    group: key.clone(),
                    count: members.count,
                    oldest_seconds: now.saturating_sub(members.oldest_since_ns) as f64 / 1e9,
                    growth_per_minute,
                    proof,
                    proven,
                    waits_on,
                    stack: members.stack.clone(),
                    threads: Vec::new(),
                },
            ));
        }
        for (key, (kind, members)) in &running {
            if !policy.is_runtime_task(&key.entry) {
                holds.push((
                    key.clone(),
                    Alert {
                        kind: *kind,
                        group: key.clone(),
                        count: members.count,
                        oldest_seconds: now.saturating_sub(members.oldest_since_ns) as f64 / 1e9,
                        growth_per_minute: None,
                        proof: None,
                        proven: 0,
                        waits_on: None,
                        stack: members.stack.clone(),
                        threads: members.threads.iter().map(|t| (**t).clone()).collect(),
                    },
                ));
            }
        }

        // Forget groups that have been empty for a whole window and fire nothing.
        let book = &self.book;
        state.groups.retain(|key, g| {
            book.kind(pid, key).is_some() || !g.history.is_idle() || !g.members.is_empty()
        });
        self.book.settle(pid, now, holds)
    }

    /// Every alert firing now, with its process, as of the last scan.
    pub fn firing(&self) -> impl Iterator<Item = (u32, &Alert)> {
        self.book.firing()
    }

    /// The process is gone: resolve its alerts and drop its state.
    pub fn forget(&mut self, pid: u32) -> Vec<Transition> {
        self.processes.remove(&pid);
        self.book.forget(pid)
    }
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
            waits_on: None,
            proven: false,
            stack: None,
            thread: None,
        }
    }

    fn snapshot(now: u64, goroutines: Vec<Observation>) -> Snapshot {
        Snapshot {
            now_ns: now * S,
            goroutines,
            policy: &crate::go::GO,
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
            waits_on: None,
            proven: false,
            stack: None,
            thread: None,
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
            waits_on: None,
            proven: false,
            stack: None,
            thread: None,
        };
        let fired = d.observe(2, &snapshot(20, vec![spinning_main]));
        assert_eq!(fired[0].alert.kind, AlertKind::GoroutineSpinning);
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
        assert_eq!(fired[0].alert.kind, AlertKind::GoroutineLeak);
        assert_eq!(fired[0].alert.proof, Some("unreachable"));
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
            kind: AlertKind::GoroutineStuck,
            ..a.clone()
        };
        assert_eq!(
            b.settle(1, 0, vec![(1, stuck)])[0].state,
            AlertState::Firing
        );
        let t = b.settle(1, S, vec![(1, a)]);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].state, AlertState::Changed);
        assert_eq!(t[0].previous, Some(AlertKind::GoroutineStuck));
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

    /// The same rules under tokio's policy: kinds named for tasks, a lost waker is proven
    /// on sight, a poll blocking once past the poll threshold is a finding, and an idle task
    /// that stays (an accept loop) is never one.
    #[test]
    fn tokio_policy_names_task_findings() {
        let tokio = |now: u64, goroutines: Vec<Observation>| Snapshot {
            now_ns: now * S,
            goroutines,
            policy: &crate::tokio::TOKIO,
        };
        let task = |id: u64, reason: &str| Observation {
            entry: "app::handler".into(),
            created_at: None,
            ..parked(id, 0, reason, 1)
        };
        let mut d = Detector::new(thresholds());
        // Idle for long, not growing: silent.
        assert!(d.observe(1, &tokio(30, vec![task(1, "idle")])).is_empty());
        let lost = d.observe(
            2,
            &tokio(30, vec![task(1, "no waker"), task(2, "no waker")]),
        );
        assert_eq!(lost[0].alert.kind, AlertKind::TaskLostWaker);
        assert_eq!(
            (lost[0].alert.proof, lost[0].alert.proven),
            (Some("no_waker"), 2)
        );
        let poll = Observation {
            state: TaskState::Running {
                since_ns: 29 * S,
                runs: 1,
                last_run_ns: 30 * S,
            },
            ..task(3, "idle")
        };
        let blocking = d.observe(3, &tokio(30, vec![poll.clone()]));
        assert_eq!(blocking[0].alert.kind, AlertKind::TaskBlocking);
        // Under the threshold (500 ms): not yet.
        let short = Observation {
            state: TaskState::Running {
                since_ns: 30 * S - S / 10,
                runs: 1,
                last_run_ns: 30 * S,
            },
            ..poll.clone()
        };
        assert!(d.observe(4, &tokio(30, vec![short])).is_empty());
        // Polled over and over: a spin, judged against the spin threshold (3 s here).
        let spin = |since: u64| Observation {
            state: TaskState::Running {
                since_ns: since * S,
                runs: 50_000,
                last_run_ns: 30 * S,
            },
            ..poll.clone()
        };
        assert!(d.observe(5, &tokio(30, vec![spin(28)])).is_empty());
        let spinning = d.observe(6, &tokio(30, vec![spin(26)]));
        assert_eq!(spinning[0].alert.kind, AlertKind::TaskSpinning);
    }
}
