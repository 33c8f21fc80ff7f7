//! Thread-level monitoring inside the loop: which processes are judged, with what identity.
//! Each process's snapshot is taken on a worker; a process that does not answer in time is
//! skipped (and said so, once) while the others are judged.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use crate::{
    bpf::{BpfError, Probes},
    detect::{ThreadDetector, ThreadSnapshot, Thresholds, Transition, nanos},
    proc,
    runtime::{Census, ProcessInfo},
    sys::{
        signals,
        workers::{Outcome, Slot, Workers},
    },
    threads::{self, Depth, ProcessState, Stale, symbols::Symbolizer},
};

/// What a worker brings back from one process.
struct Scanned {
    /// Set when the process was identified on this trip.
    identity: Option<Option<ProcessInfo>>,
    snapshot: ThreadSnapshot,
    stale: Stale,
}

struct Watched {
    start: u64,
    /// None until identified; Some(None) for processes not to judge (kernel threads).
    info: Option<Option<ProcessInfo>>,
    slot: Slot<ProcessState, Scanned>,
    /// Its threads, counted at the last scan.
    census: Census,
}

/// Judges the threads of every process (`leakmon run`) or of the watched ones.
pub(super) struct ThreadWatch {
    detector: ThreadDetector,
    symbolizer: Symbolizer,
    /// None: every process on the host.
    scope: Option<HashSet<u32>>,
    procs: HashMap<u32, Watched>,
    thresholds: Thresholds,
    /// How long a process's snapshot may take.
    timeout: Duration,
    /// Snapshots that came back after their deadline, judged at the next collect.
    late: Vec<(u32, Scanned)>,
}

impl ThreadWatch {
    /// Attaches the thread probes and seeds them with what /proc shows of `scope`.
    pub(super) fn start(
        probes: &mut Probes,
        workers: &Workers,
        symbolizer: Symbolizer,
        thresholds: Thresholds,
        timeout: Duration,
        scope: Option<HashSet<u32>>,
    ) -> Result<Self, BpfError> {
        probes.attach_threads()?;
        let pids: Vec<u32> = match &scope {
            Some(pids) => pids.iter().copied().collect(),
            None => super::all_pids(),
        };
        let now = proc::monotonic_ns();
        let pending: Vec<_> = pids
            .into_iter()
            .map(|pid| workers.run(move || threads::seed(pid, now)))
            .collect();
        let deadline = Instant::now() + timeout;
        let mut unanswered = 0;
        for p in pending {
            match p.wait(deadline, signals::stop_requested) {
                Ok(seeds) => {
                    for (tid, state, wait) in seeds {
                        probes.seed_thread(tid, state, wait);
                    }
                }
                Err(_) => unanswered += 1,
            }
        }
        if unanswered > 0 {
            log::warn!(
                "{unanswered} process(es) did not answer in {:?} while their threads were \
                 listed: their waits count from when they are next seen",
                timeout
            );
        }
        match &scope {
            Some(pids) => log::info!("tracing the threads of {} process(es)", pids.len()),
            None => log::info!("tracing the threads of every process"),
        }
        Ok(Self {
            detector: ThreadDetector::new(thresholds),
            symbolizer,
            scope,
            procs: HashMap::new(),
            thresholds,
            timeout,
            late: Vec::new(),
        })
    }

    /// Thread alerts firing now.
    pub(super) fn firing(&self) -> impl Iterator<Item = (u32, &crate::detect::Alert)> {
        self.detector.firing()
    }

    /// Whether any process in scope is alive (`watch` ends when none is).
    pub(super) fn any_alive(&self) -> bool {
        self.scope
            .as_ref()
            .is_none_or(|pids| pids.iter().any(|pid| proc::is_alive(*pid)))
    }

    /// Every identified process's threads, counted at the last scan.
    pub(super) fn counts(&self) -> impl Iterator<Item = (&ProcessInfo, &Census)> {
        self.procs
            .values()
            .filter_map(|w| Some((w.info.as_ref()?.as_ref()?, &w.census)))
    }

    /// Processes skipped because a worker still has them past its deadline.
    pub(super) fn stuck(&self) -> usize {
        self.procs.values().filter(|w| w.slot.is_stuck()).count()
    }

    /// First half of a scan: sends a snapshot of every process in scope to the workers.
    pub(super) fn dispatch(&mut self, probes: &Probes, workers: &Workers, now_ns: u64) {
        let depth = Depth {
            deep_ns: nanos(self.thresholds.block),
            settle_ns: nanos(self.thresholds.scan_interval.min(self.thresholds.block)),
        };
        let by_process = threads::by_process(probes.thread_tables(), std::process::id());
        for (pid, threads) in by_process {
            if self.scope.as_ref().is_some_and(|s| !s.contains(&pid)) {
                continue;
            }
            let Ok((_, start)) = proc::stat(pid) else {
                continue;
            };
            let w = self.procs.entry(pid).or_insert_with(|| Watched {
                start,
                info: None,
                slot: Slot::new(ProcessState::default()),
                census: Census::new(&threads::THREAD_COUNT),
            });
            if w.start != start {
                // The PID was reused: the gone check resolves the old one's alerts.
                continue;
            }
            if let Some(late) = w.slot.reclaim() {
                log::info!("PID {pid}'s thread snapshot finished late: judged now");
                self.late.push((pid, late));
            }
            if matches!(w.info, Some(None)) {
                continue;
            }
            w.census = threads.count();
            let identify = w.info.is_none();
            let symbolizer = self.symbolizer.clone();
            w.slot.dispatch(workers, move |state| {
                let identity = identify.then(|| identify_process(pid));
                let (snapshot, stale) = state.snapshot(&symbolizer, pid, threads, now_ns, depth);
                Scanned {
                    identity,
                    snapshot,
                    stale,
                }
            });
        }
    }

    /// Second half: takes the snapshots back (until `deadline`), judges them, and resolves
    /// what processes that are gone had firing. Returns the transitions with their process;
    /// `task_info` names processes whose tasks are watched (as their runtime does).
    pub(super) fn collect(
        &mut self,
        probes: &mut Probes,
        deadline: Instant,
        task_info: impl Fn(u32) -> Option<ProcessInfo>,
    ) -> Vec<(ProcessInfo, Transition)> {
        let mut out = Vec::new();
        let mut lost = Vec::new();
        let mut done = std::mem::take(&mut self.late);
        for (pid, w) in &mut self.procs {
            match w.slot.settle(deadline, signals::stop_requested) {
                Outcome::Done(s) => done.push((*pid, s)),
                Outcome::Late { first } => {
                    if first {
                        log::warn!(
                            "PID {pid} did not answer within {:?} (its memory or /proc files \
                             block: a hung mount?): its threads are judged when its snapshot \
                             is done; every other process is still watched",
                            self.timeout
                        );
                    }
                }
                Outcome::Lost => lost.push(*pid),
                Outcome::Idle => {}
            }
        }
        for (pid, scanned) in done {
            let Some(w) = self.procs.get_mut(&pid) else {
                continue;
            };
            for tid in scanned.stale.threads {
                probes.forget_thread(tid);
            }
            for (tid, wait) in &scanned.stale.waits {
                probes.forget_wait(*tid, wait);
            }
            if let Some(identity) = scanned.identity {
                w.info = Some(identity);
            }
            let Some(info) = task_info(pid).or_else(|| w.info.clone().flatten()) else {
                continue;
            };
            for t in self.detector.observe(pid, &scanned.snapshot) {
                out.push((info.clone(), t));
            }
        }
        for pid in lost {
            log::warn!("PID {pid}: a worker failed while taking its threads' snapshot");
            self.procs.remove(&pid);
        }
        // Processes gone (exited: a zombie counts, it runs no more; or the PID was reused):
        // resolve what they had firing.
        let gone: Vec<u32> = self
            .procs
            .iter()
            .filter(|(pid, w)| {
                proc::stat(**pid)
                    .ok()
                    .is_none_or(|(state, s)| state == 'Z' || s != w.start)
            })
            .map(|(pid, _)| *pid)
            .collect();
        for pid in gone {
            if let Some(w) = self.procs.remove(&pid)
                && let Some(info) = task_info(pid).or_else(|| w.info.flatten())
            {
                for t in self.detector.forget(pid) {
                    out.push((info.clone(), t));
                }
            }
        }
        out
    }
}

/// The identity of a process whose tasks are not watched, looked up once, on a worker (its
/// environment is read for the pod name).
fn identify_process(pid: u32) -> Option<ProcessInfo> {
    // Kernel threads have no executable: nothing to judge.
    let exe = proc::exe_path(pid).ok()?;
    Some(ProcessInfo {
        pid,
        exe: exe.display().to_string(),
        runtime: "native",
        runtime_version: String::new(),
        container: proc::container_of(pid),
    })
}
