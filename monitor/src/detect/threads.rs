//! Judging a process's OS threads: lock cycles (`thread_deadlock`), locks never acquired
//! (`thread_stuck`), threads that pile up blocked (`thread_leak`) and processes whose every
//! thread is blocked (`process_hung`). Input is plain data, like the goroutine rules.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use super::{
    Activity, Alert, AlertBook, AlertKind, Family, GroupKey, Severity, Site, ThreadReport,
    Transition, alert_kind, nanos,
    rules::{History, Thresholds},
};

pub(crate) static THREAD_DEADLOCK: AlertKind = alert_kind!("thread_deadlock",
    members: "threads",
    activity: Activity::Blocked,
    severity: Severity::Error,
    family: Family::Thread,
    hint: "threads hold locks while waiting for each other's: take locks in one global order \
           (or all at once, e.g. std::scoped_lock), never call out while holding a lock, or use \
           pthread_mutex_timedlock and back off",
    running: AlertKind::RUNNING,
    running_at: false,
);

pub(crate) static THREAD_STUCK: AlertKind = alert_kind!("thread_stuck",
    members: "threads",
    activity: Activity::Blocked,
    severity: Severity::Warn,
    family: Family::Thread,
    hint: "threads wait on a lock that is never released: make sure every path unlocks (RAII \
           guards, pthread_cleanup_push), keep lock order consistent, and bound waits with a \
           timed lock",
    running: AlertKind::RUNNING,
    running_at: false,
);

pub(crate) static THREAD_LEAK: AlertKind = alert_kind!("thread_leak",
    members: "threads",
    activity: Activity::Blocked,
    severity: Severity::Warn,
    family: Family::Thread,
    hint: "threads are started faster than they finish and stay blocked: use a fixed-size \
           thread pool or a semaphore to bound them, join or detach every thread, and give \
           blocked threads a way out (timeouts, cancellation, closing what they wait on)",
    running: AlertKind::RUNNING,
    running_at: false,
);

pub(crate) static PROCESS_HUNG: AlertKind = alert_kind!("process_hung",
    members: "threads",
    activity: Activity::Blocked,
    severity: Severity::Error,
    family: Family::Thread,
    hint: "every thread is blocked and at least one waits on a lock: the process cannot make \
           progress; look for a lock cycle or a lock held by a thread that exited, and restart \
           it after taking a core dump (gcore) for diagnosis",
    running: AlertKind::RUNNING,
    running_at: false,
);

/// The kinds of alert about threads.
pub(crate) static THREAD_KINDS: &[&AlertKind] =
    &[&THREAD_DEADLOCK, &THREAD_STUCK, &THREAD_LEAK, &PROCESS_HUNG];

/// What a thread's futex wait is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum WaitKind {
    /// Waiting to acquire a lock.
    Lock,
    /// Waiting for work, a signal or another thread's exit (condition variables, semaphores,
    /// joins, runtime parking): normal however long it lasts.
    Idle,
    /// A wait with a timeout: it ends by itself.
    Timed,
}

impl WaitKind {
    /// The wait reason alerts print.
    pub(crate) fn reason(self, lock: LockFlavor) -> &'static str {
        match (self, lock) {
            (Self::Lock, LockFlavor::PthreadMutex) => "pthread mutex",
            (Self::Lock, LockFlavor::PiMutex) => "PI mutex",
            (Self::Lock, LockFlavor::Other) => "lock",
            (Self::Idle, _) => "idle futex wait",
            (Self::Timed, _) => "timed futex wait",
        }
    }
}

/// Which kind of lock, which says where its owner is recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum LockFlavor {
    /// glibc `pthread_mutex_t`: owner in `__owner`.
    PthreadMutex,
    /// A priority-inheritance futex: owner in the futex word.
    PiMutex,
    /// Owner not recorded (Rust std, most language runtimes' locks).
    Other,
}

/// A futex wait a thread is in.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct FutexObs {
    pub uaddr: u64,
    pub since_ns: u64,
    pub kind: WaitKind,
    pub flavor: LockFlavor,
    /// The lock's owner (host thread id), where the lock records it.
    pub owner_tid: Option<u32>,
}

/// One thread as seen at a scan.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ThreadObs {
    pub tid: u32,
    pub name: Arc<str>,
    /// Off a CPU (sleeping) since; None while it runs or waits to run.
    pub off_cpu_since_ns: Option<u64>,
    pub wait: Option<FutexObs>,
    /// First frame in the program's own code, and the outermost one (where the thread
    /// started); known for threads blocked past the threshold.
    pub blocked_at: Option<Arc<Site>>,
    pub entry: Option<Arc<str>>,
    pub stack: Arc<[String]>,
}

impl ThreadObs {
    /// Since when it has been blocked: in its futex wait, or off-CPU.
    fn blocked_since(&self) -> Option<u64> {
        self.wait
            .as_ref()
            .map(|w| w.since_ns)
            .or(self.off_cpu_since_ns)
    }

    fn reason(&self) -> &'static str {
        match &self.wait {
            Some(w) => w.kind.reason(w.flavor),
            None => "blocked",
        }
    }
}

/// All threads of one process at one instant.
#[derive(Clone, Debug)]
pub(crate) struct ThreadSnapshot {
    pub now_ns: u64,
    pub threads: Vec<ThreadObs>,
}

/// Threads listed per alert at most (`count` has them all).
const MAX_REPORTED: usize = 16;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Key {
    /// The lock addresses of the cycle, sorted.
    Deadlock(Vec<u64>),
    Stuck(GroupKey),
    Leak(GroupKey),
    Hung,
}

/// A lock cycle as seen once: its (thread, lock) pairs, sorted.
type CycleId = Vec<(u32, u64)>;

#[derive(Debug, Default)]
struct ProcessState {
    /// Cycles seen in the previous snapshot: a cycle is reported only when the owners read
    /// afresh at two scans in a row make the same one (a lock changes hands between waiters,
    /// and one read can pair an old owner with a new wait).
    cycles: BTreeSet<CycleId>,
    leak_histories: HashMap<GroupKey, History>,
    thread_count: History,
}

#[derive(Debug)]
pub(crate) struct ThreadDetector {
    thresholds: Thresholds,
    processes: HashMap<u32, ProcessState>,
    book: AlertBook<Key>,
}

impl ThreadDetector {
    pub(crate) fn new(thresholds: Thresholds) -> Self {
        Self {
            thresholds,
            processes: HashMap::new(),
            book: AlertBook::new(thresholds.update_interval),
        }
    }

    /// Takes one snapshot of `pid`'s threads and returns the alerts that started or ended.
    pub(crate) fn observe(&mut self, pid: u32, snapshot: &ThreadSnapshot) -> Vec<Transition> {
        let t = self.thresholds;
        let now = snapshot.now_ns;
        let block = nanos(t.block);
        let state = self.processes.entry(pid).or_default();
        let by_tid: HashMap<u32, &ThreadObs> =
            snapshot.threads.iter().map(|t| (t.tid, t)).collect();
        let age = |since: u64| now.saturating_sub(since);
        let report = |t: &ThreadObs| ThreadReport {
            tid: t.tid,
            name: t.name.clone(),
            waits_on: t.wait.as_ref().map(|w| format!("{:#x}", w.uaddr)),
            owner_tid: t.wait.as_ref().and_then(|w| w.owner_tid),
            waited_seconds: t.blocked_since().map_or(0.0, |s| age(s) as f64 / 1e9),
            blocked_at: t.blocked_at.clone(),
            stack: t.stack.clone(),
            hot_frames: Arc::from([]),
        };
        let group_key = |t: &ThreadObs| GroupKey {
            created_at: None,
            entry: t.entry.clone().unwrap_or_else(|| t.name.clone()),
            blocked_at: t.blocked_at.clone(),
            wait_reason: Some(t.reason().into()),
        };
        let mut wanted: BTreeMap<Key, Alert> = BTreeMap::new();

        // Lock waits, and the wait-for graph through the owners the locks record. A cycle is
        // final once it has held for a scan interval and two snapshots in a row show it; a
        // lone wait only past the threshold.
        let settled = nanos(t.scan_interval).min(block);
        let mut in_cycle = BTreeSet::new();
        let mut cycles = BTreeSet::new();
        for start in snapshot.threads.iter().filter(|t| lock_wait(t).is_some()) {
            let mut path = vec![start.tid];
            let mut tid = start.tid;
            while let Some(owner) = by_tid
                .get(&tid)
                .and_then(|t| lock_wait(t))
                .and_then(|w| w.owner_tid)
            {
                if let Some(i) = path.iter().position(|p| *p == owner) {
                    let cycle = &path[i..];
                    let members: Vec<&ThreadObs> = cycle
                        .iter()
                        .filter_map(|t| by_tid.get(t).copied())
                        .collect();
                    let settled = members
                        .iter()
                        .all(|m| lock_wait(m).is_some_and(|w| age(w.since_ns) >= settled));
                    let mut id: CycleId = members
                        .iter()
                        .filter_map(|m| lock_wait(m).map(|w| (m.tid, w.uaddr)))
                        .collect();
                    id.sort_unstable();
                    let confirmed = state.cycles.contains(&id);
                    let fresh = cycle.iter().all(|t| !in_cycle.contains(t));
                    if fresh {
                        // Not reported as stuck meanwhile, confirmed or not.
                        in_cycle.extend(cycle.iter().copied());
                        cycles.insert(id);
                    }
                    if let Some(first) = members.first()
                        && settled
                        && confirmed
                        && fresh
                    {
                        let mut locks: Vec<u64> = members
                            .iter()
                            .filter_map(|m| lock_wait(m).map(|w| w.uaddr))
                            .collect();
                        locks.sort_unstable();
                        let oldest = members
                            .iter()
                            .filter_map(|m| m.blocked_since())
                            .min()
                            .unwrap_or(now);
                        wanted.insert(
                            Key::Deadlock(locks),
                            Alert {
                                kind: &THREAD_DEADLOCK,
                                group: group_key(first),
                                count: members.len() as u64,
                                oldest_seconds: age(oldest) as f64 / 1e9,
                                growth_per_minute: None,
                                proof: None,
                                proven: 0,
                                marking: None,
                                waits_on: None,
                                stack: None,
                                threads: members.iter().map(|m| report(m)).collect(),
                                hint: THREAD_DEADLOCK.hint,
                            },
                        );
                    }
                    break;
                }
                if path.len() > 64 {
                    break;
                }
                path.push(owner);
                tid = owner;
            }
        }

        state.cycles = cycles;

        // Other lock waits past the threshold, grouped by where they wait.
        let mut stuck: BTreeMap<GroupKey, Vec<&ThreadObs>> = BTreeMap::new();
        for t in &snapshot.threads {
            if let Some(w) = lock_wait(t)
                && age(w.since_ns) >= block
                && !in_cycle.contains(&t.tid)
            {
                stuck.entry(group_key(t)).or_default().push(t);
            }
        }
        for (key, members) in stuck {
            wanted.insert(
                Key::Stuck(key.clone()),
                group_alert(&THREAD_STUCK, key, &members, now, None, &report),
            );
        }

        // Threads that stay blocked, by where: a leak when a group and the process's thread
        // count both keep growing.
        state
            .thread_count
            .push(now, snapshot.threads.len() as u64, t.leak_window);
        let mut blocked: BTreeMap<GroupKey, Vec<&ThreadObs>> = BTreeMap::new();
        for t in &snapshot.threads {
            if t.blocked_since().is_some_and(|s| age(s) >= block) {
                blocked.entry(group_key(t)).or_default().push(t);
            }
        }
        for (key, members) in &blocked {
            state.leak_histories.entry(key.clone()).or_default().push(
                now,
                members.len() as u64,
                t.leak_window,
            );
        }
        for (key, history) in state.leak_histories.iter_mut() {
            if !blocked.contains_key(key) {
                history.push(now, 0, t.leak_window);
            }
        }
        let process_grows = state
            .thread_count
            .keeps_growing(now, t.leak_window, t.leak_min_growth);
        for (key, members) in &blocked {
            let Some(history) = state.leak_histories.get(key) else {
                continue;
            };
            let was_leaking = self.book.kind(pid, &Key::Leak(key.clone())).is_some();
            let leaking = if was_leaking {
                history.growth(now, t.leak_window).is_none_or(|g| g > 0)
            } else {
                process_grows && history.keeps_growing(now, t.leak_window, t.leak_min_growth)
            };
            if leaking {
                let growth = history
                    .growth(now, t.leak_window)
                    .map(|g| g as f64 * 60.0 / t.leak_window.as_secs_f64().max(1e-9));
                wanted.insert(
                    Key::Leak(key.clone()),
                    group_alert(&THREAD_LEAK, key.clone(), members, now, growth, &report),
                );
            }
        }

        // Every thread blocked past the threshold with no way out by itself (no timeout, no
        // I/O), at least one on a lock.
        let all_stuck = !snapshot.threads.is_empty()
            && snapshot.threads.iter().all(|t| {
                t.off_cpu_since_ns.is_some_and(|s| age(s) >= block)
                    && t.wait
                        .as_ref()
                        .is_some_and(|w| w.kind != WaitKind::Timed && age(w.since_ns) >= block)
            })
            && snapshot.threads.iter().any(|t| lock_wait(t).is_some());
        if all_stuck {
            let members: Vec<&ThreadObs> = snapshot.threads.iter().collect();
            if let Some(first_lock) = snapshot.threads.iter().find(|t| lock_wait(t).is_some()) {
                wanted.insert(
                    Key::Hung,
                    group_alert(
                        &PROCESS_HUNG,
                        group_key(first_lock),
                        &members,
                        now,
                        None,
                        &report,
                    ),
                );
            }
        }

        let book = &self.book;
        state
            .leak_histories
            .retain(|key, h| book.kind(pid, &Key::Leak(key.clone())).is_some() || !h.is_idle());
        self.book.settle(pid, now, wanted.into_iter().collect())
    }

    /// Every alert firing now, with its process, as of the last scan.
    pub(crate) fn firing(&self) -> impl Iterator<Item = (u32, &Alert)> {
        self.book.firing()
    }

    /// The process is gone: resolve its alerts and drop its state.
    pub(crate) fn forget(&mut self, pid: u32) -> Vec<Transition> {
        self.processes.remove(&pid);
        self.book.forget(pid)
    }
}

fn lock_wait(t: &ThreadObs) -> Option<&FutexObs> {
    t.wait.as_ref().filter(|w| w.kind == WaitKind::Lock)
}

fn group_alert(
    kind: &'static AlertKind,
    group: GroupKey,
    members: &[&ThreadObs],
    now: u64,
    growth_per_minute: Option<f64>,
    report: &dyn Fn(&ThreadObs) -> ThreadReport,
) -> Alert {
    let oldest = members
        .iter()
        .filter_map(|m| m.blocked_since())
        .min()
        .unwrap_or(now);
    let mut threads: Vec<ThreadReport> = members.iter().map(|m| report(m)).collect();
    threads.sort_by(|a, b| b.waited_seconds.total_cmp(&a.waited_seconds));
    threads.truncate(MAX_REPORTED);
    Alert {
        kind,
        group,
        count: members.len() as u64,
        oldest_seconds: now.saturating_sub(oldest) as f64 / 1e9,
        growth_per_minute,
        proof: None,
        proven: 0,
        marking: None,
        waits_on: None,
        stack: None,
        threads,
        hint: kind.hint,
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::detect::AlertState;

    const S: u64 = 1_000_000_000;

    fn thresholds() -> Thresholds {
        Thresholds::for_tests()
    }

    fn thread(tid: u32, since: u64, wait: Option<(u64, WaitKind, Option<u32>)>) -> ThreadObs {
        ThreadObs {
            tid,
            name: format!("t{tid}").into(),
            off_cpu_since_ns: Some(since * S),
            wait: wait.map(|(uaddr, kind, owner_tid)| FutexObs {
                uaddr,
                since_ns: since * S,
                kind,
                flavor: LockFlavor::PthreadMutex,
                owner_tid,
            }),
            blocked_at: Some(Arc::new(Site {
                function: "worker".into(),
                file: "/src/w.c".into(),
                line: 10 + tid,
            })),
            entry: Some("worker".into()),
            stack: Arc::from([]),
        }
    }

    fn snapshot(now: u64, threads: Vec<ThreadObs>) -> ThreadSnapshot {
        ThreadSnapshot {
            now_ns: now * S,
            threads,
        }
    }

    fn kinds(transitions: &[Transition]) -> Vec<(&'static AlertKind, AlertState)> {
        transitions
            .iter()
            .map(|t| (t.alert.kind, t.state))
            .collect()
    }

    #[test]
    fn a_cycle_is_one_deadlock_once_settled() {
        let mut d = ThreadDetector::new(thresholds());
        let cycle = |now| {
            snapshot(
                now,
                vec![
                    thread(1, 0, Some((0xa, WaitKind::Lock, Some(2)))),
                    thread(2, 0, Some((0xb, WaitKind::Lock, Some(1)))),
                    // Running: the process is not hung.
                    ThreadObs {
                        off_cpu_since_ns: None,
                        ..thread(3, 0, None)
                    },
                ],
            )
        };
        // Younger than a scan interval: not yet.
        assert!(d.observe(7, &snapshot(0, cycle(0).threads)).is_empty());
        let fired = d.observe(7, &cycle(1));
        assert_eq!(kinds(&fired), [(&THREAD_DEADLOCK, AlertState::Firing)]);
        let alert = &fired[0].alert;
        assert_eq!(alert.count, 2);
        assert_eq!(alert.threads[0].owner_tid, Some(2));
        assert_eq!(alert.threads[0].waits_on.as_deref(), Some("0xa"));
        // Past the block threshold the cycle is still one deadlock, not also stuck.
        assert!(d.observe(7, &cycle(5)).is_empty());
        let resolved = d.observe(7, &snapshot(6, Vec::new()));
        assert_eq!(kinds(&resolved), [(&THREAD_DEADLOCK, AlertState::Resolved)]);
    }

    #[test]
    fn a_cycle_read_once_is_not_a_deadlock() {
        // A holds M and B, C wait on it; M passes to B while the owner read still says A,
        // and A then waits on a lock B holds: one read pairs the old owner with the new wait.
        let mut d = ThreadDetector::new(thresholds());
        let stale = snapshot(
            2,
            vec![
                thread(1, 0, Some((0xb, WaitKind::Lock, Some(2)))),
                thread(2, 0, Some((0xa, WaitKind::Lock, Some(1)))),
                thread(3, 0, Some((0xa, WaitKind::Lock, Some(1)))),
            ],
        );
        let deadlock = (&THREAD_DEADLOCK, AlertState::Firing);
        assert!(!kinds(&d.observe(7, &stale)).contains(&deadlock));
        // Read afresh: B owns M and runs; A waits on B's lock, C on M: no cycle.
        let fresh = snapshot(
            3,
            vec![
                thread(1, 0, Some((0xb, WaitKind::Lock, Some(2)))),
                ThreadObs {
                    off_cpu_since_ns: None,
                    ..thread(2, 0, None)
                },
                thread(3, 0, Some((0xa, WaitKind::Lock, Some(2)))),
            ],
        );
        let fired = d.observe(7, &fresh);
        assert!(!kinds(&fired).contains(&deadlock), "{fired:?}");
        // The same cycle on two fresh reads in a row is one.
        let once = snapshot(4, stale.threads.clone());
        assert!(!kinds(&d.observe(7, &once)).contains(&deadlock));
        let twice = snapshot(5, stale.threads.clone());
        assert!(kinds(&d.observe(7, &twice)).contains(&deadlock));
    }

    #[test]
    fn owner_less_locks_are_stuck_idle_waits_are_not() {
        let mut d = ThreadDetector::new(thresholds());
        let threads = vec![
            thread(1, 0, Some((0xa, WaitKind::Lock, None))),
            thread(2, 0, Some((0xc, WaitKind::Idle, None))),
            thread(3, 0, Some((0xd, WaitKind::Timed, None))),
            thread(4, 0, None),
        ];
        assert!(d.observe(7, &snapshot(1, threads.clone())).is_empty());
        let fired = d.observe(7, &snapshot(3, threads));
        // Not hung: one thread sleeps with a timeout.
        assert_eq!(kinds(&fired), [(&THREAD_STUCK, AlertState::Firing)]);
        assert_eq!(fired[0].alert.count, 1);
        assert_eq!(
            fired[0].alert.group.blocked_at.as_ref().map(|s| s.line),
            Some(11)
        );
    }

    #[test]
    fn every_thread_on_untimed_waits_with_a_lock_is_hung() {
        let mut d = ThreadDetector::new(thresholds());
        let threads = vec![
            thread(1, 0, Some((0xa, WaitKind::Lock, None))),
            thread(2, 0, Some((0xc, WaitKind::Idle, None))),
        ];
        let fired = d.observe(7, &snapshot(3, threads));
        assert_eq!(
            kinds(&fired),
            [
                (&THREAD_STUCK, AlertState::Firing),
                (&PROCESS_HUNG, AlertState::Firing)
            ]
        );
        let resolved = d.forget(7);
        assert_eq!(resolved.len(), 2);
    }

    #[test]
    fn growing_blocked_threads_leak_a_fixed_pool_does_not() {
        let mut leaky = ThreadDetector::new(thresholds());
        let mut pool = ThreadDetector::new(thresholds());
        let mut fired = Vec::new();
        for now in 0..=12u64 {
            // One more blocked thread per second, all at the same place.
            let threads = (0..=now as u32)
                .map(|i| ThreadObs {
                    blocked_at: thread(0, 0, None).blocked_at,
                    ..thread(100 + i, u64::from(i), Some((0x1, WaitKind::Idle, None)))
                })
                .collect();
            fired.extend(leaky.observe(1, &snapshot(now, threads)));
            let idle = (0..8)
                .map(|i| thread(i, 0, Some((0x2, WaitKind::Idle, None))))
                .collect();
            assert!(pool.observe(1, &snapshot(now, idle)).is_empty(), "t={now}");
        }
        assert_eq!(kinds(&fired), [(&THREAD_LEAK, AlertState::Firing)]);
        assert!(fired[0].alert.growth_per_minute.is_some_and(|g| g > 0.0));
        assert!(fired[0].alert.threads.len() <= MAX_REPORTED);
    }
}
