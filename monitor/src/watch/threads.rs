//! Thread-level monitoring inside the loop: which processes are judged, with what identity.

use std::collections::{HashMap, HashSet};

use crate::{
    bpf::{BpfError, Probes},
    detect::{ThreadDetector, Thresholds, Transition},
    output::ProcessInfo,
    proc,
    threads::ThreadScanner,
};

/// Judges the threads of every process (`leakmon run`) or of the watched ones.
pub struct ThreadWatch {
    scanner: ThreadScanner,
    detector: ThreadDetector,
    /// None: every process on the host.
    scope: Option<HashSet<u32>>,
    /// Identity of processes judged (not Go targets, whose identity the caller has), with
    /// their start time against PID reuse; None for processes not to judge (kernel threads).
    infos: HashMap<u32, (u64, Option<ProcessInfo>)>,
    thresholds: Thresholds,
}

impl ThreadWatch {
    /// Attaches the thread probes and seeds them with what /proc shows of `scope`.
    pub fn start(
        probes: &mut Probes,
        thresholds: Thresholds,
        scope: Option<HashSet<u32>>,
    ) -> Result<Self, BpfError> {
        probes.attach_threads()?;
        let mut scanner = ThreadScanner::default();
        let pids: Vec<u32> = match &scope {
            Some(pids) => pids.iter().copied().collect(),
            None => super::all_pids(),
        };
        scanner.seed(probes, pids, proc::monotonic_ns());
        match &scope {
            Some(pids) => log::info!("tracing the threads of {} process(es)", pids.len()),
            None => log::info!("tracing the threads of every process"),
        }
        Ok(Self {
            scanner,
            detector: ThreadDetector::new(thresholds),
            scope,
            infos: HashMap::new(),
            thresholds,
        })
    }

    /// Thread alerts firing now.
    pub fn firing(&self) -> impl Iterator<Item = (u32, &crate::detect::Alert)> {
        self.detector.firing()
    }

    /// Whether any process in scope is alive (`watch` ends when none is).
    pub fn any_alive(&self) -> bool {
        self.scope
            .as_ref()
            .is_none_or(|pids| pids.iter().any(|pid| proc::is_alive(*pid)))
    }

    /// One pass: snapshots every process in scope and returns the alert transitions with the
    /// process they are about. `go_info` names Go targets.
    pub fn scan(
        &mut self,
        probes: &mut Probes,
        now_ns: u64,
        go_info: impl Fn(u32) -> Option<ProcessInfo>,
    ) -> Vec<(ProcessInfo, Transition)> {
        let ns = |d: std::time::Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let (block, settle) = (
            ns(self.thresholds.block),
            ns(self.thresholds.scan_interval.min(self.thresholds.block)),
        );
        let tables = probes.thread_tables();
        let live: HashSet<u32> = tables
            .threads
            .keys()
            .chain(tables.waits.keys())
            .copied()
            .collect();
        let by_process = ThreadScanner::by_process(tables, std::process::id());
        let mut out = Vec::new();
        for (pid, threads) in by_process {
            if self.scope.as_ref().is_some_and(|s| !s.contains(&pid)) {
                continue;
            }
            let info = match go_info(pid) {
                Some(info) => {
                    if let Ok((_, start)) = proc::stat(pid) {
                        self.infos.insert(pid, (start, Some(info.clone())));
                    }
                    info
                }
                None => match self.info(pid) {
                    Some(info) => info,
                    None => continue,
                },
            };
            let snapshot = self
                .scanner
                .snapshot(probes, pid, threads, now_ns, settle, block);
            for t in self.detector.observe(pid, &snapshot) {
                out.push((info.clone(), t));
            }
        }
        // Processes gone: resolve what they had firing.
        let gone: Vec<u32> = self
            .infos
            .iter()
            .filter(|(pid, (start, _))| {
                // Exited (a zombie counts: it runs no more), or the PID was reused.
                proc::stat(**pid)
                    .ok()
                    .is_none_or(|(state, s)| state == 'Z' || s != *start)
            })
            .map(|(pid, _)| *pid)
            .collect();
        for pid in gone {
            if let Some((_, Some(info))) = self.infos.remove(&pid) {
                for t in self.detector.forget(pid) {
                    out.push((info.clone(), t));
                }
            }
        }
        self.scanner.retain(&live);
        out
    }

    /// The identity of a non-Go process, looked up once.
    fn info(&mut self, pid: u32) -> Option<ProcessInfo> {
        let start = proc::stat(pid).ok()?.1;
        if let Some((s, info)) = self.infos.get(&pid)
            && *s == start
        {
            return info.clone();
        }
        // Kernel threads have no executable: nothing to judge.
        let info = proc::exe_path(pid).ok().map(|exe| ProcessInfo {
            pid,
            exe: exe.display().to_string(),
            runtime: "native",
            runtime_version: String::new(),
            container: proc::container_of(pid),
        });
        self.infos.insert(pid, (start, info.clone()));
        info
    }
}
