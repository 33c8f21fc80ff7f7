//! A dump of one process taken here and now (`leakmon dump --pid N`): no probes, nothing
//! attached; its runtime's tasks read from outside, and its proofs run so the dump carries
//! verdicts.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use super::{Dump, Task};
use crate::{
    bpf::TaskRecords,
    detect::{Due, TaskState, Thresholds, WaitClass},
    proc,
    runtime::{
        Binaries, Context, InspectError, Inspected, Runtime, RuntimeError, ScanInput, Scanned,
        registry::RUNTIMES,
    },
    threads::symbols::Symbolizer,
};

/// What a dump takes from the settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct DumpOptions {
    pub unvalidated: bool,
    /// Bytes of target memory its proofs may read (0: no verdicts).
    pub reach_budget: u64,
    /// What its symbol caches may hold.
    pub memory_budget: u64,
    /// Tasks it lists, at most (the rest are counted).
    pub max_listed: usize,
}

/// Tasks a dump taken here lists, at most: 200,000 goroutines with their stacks shared fit in
/// about 40 MiB; past that the dump says how many it left out rather than grow.
pub(crate) const MAX_LISTED: usize = 200_000;

#[derive(Debug, thiserror::Error)]
pub(crate) enum DumpError {
    #[error("no process with PID {pid}")]
    NoProcess { pid: u32 },
    #[error(transparent)]
    Inspect(#[from] InspectError),
    #[error(
        "PID {pid} ({exe}) runs no runtime whose tasks leakmon reads ({absent}): only its \
         threads can be watched (`leakmon watch --pid {pid}`)"
    )]
    NoRuntime {
        pid: u32,
        exe: PathBuf,
        absent: String,
    },
    #[error("PID {pid}: another inspection of its executable is under way; try again")]
    Busy { pid: u32 },
    #[error("PID {pid}: its {runtime} tasks could not be dumped")]
    Runtime {
        pid: u32,
        runtime: &'static str,
        #[source]
        source: RuntimeError,
    },
    #[error("PID {pid} exited during the dump")]
    Exited { pid: u32 },
}

/// Scans run before the dump, a moment apart: a proof needs two reachability analyses in a
/// row that agree, and the first scan only finds the candidates.
const PROOF_SCANS: usize = 3;
const PROOF_PAUSE: Duration = Duration::from_millis(200);

/// Tasks a dump judges, at most (its scans read every task's stack, and proofs the heap).
const MAX_JUDGED: u64 = 100_000;

/// A scan's input now: tasks parked at least `block` are judged.
fn scan_input(block: Duration) -> ScanInput {
    ScanInput {
        due: Due {
            now_ns: proc::monotonic_ns(),
            thresholds: Thresholds {
                block,
                ..Thresholds::default()
            },
        },
        records: TaskRecords::new(),
    }
}

/// Takes a dump of `pid`.
pub(crate) fn take(pid: u32, options: &DumpOptions) -> Result<Dump, DumpError> {
    if !proc::is_alive(pid) {
        return Err(DumpError::NoProcess { pid });
    }
    let context = Context {
        unvalidated: options.unvalidated,
        probe_parks: false,
        reach_budget: options.reach_budget,
        symbolizer: Symbolizer::new(options.memory_budget / 2),
    };
    let runtimes: Arc<[Arc<dyn Runtime>]> = RUNTIMES.iter().map(|r| (r.start)(&context)).collect();
    let binaries = Binaries::new(runtimes);
    let mut source = match binaries.inspect(pid)? {
        Inspected::Source(s) => s,
        Inspected::Plain(exe) => {
            return Err(DumpError::NoRuntime {
                pid,
                exe,
                absent: binaries.absent(),
            });
        }
        Inspected::Busy => return Err(DumpError::Busy { pid }),
    };
    let runtime = source.process().runtime;
    let start_time = source.start_time();
    let mut notes = Vec::new();
    // A first scan judges nothing and only counts: proofs are run where they fit.
    let count = match source.scan(scan_input(Duration::MAX)) {
        Scanned::Tasks { census, .. } => census.map_or(0, |c| c.total()),
        _ => 0,
    };
    let mut verdicts = std::collections::HashMap::new();
    if options.reach_budget == 0 {
        notes.push("proofs are off (reach_budget = 0): no verdicts".to_owned());
    } else if count > MAX_JUDGED {
        notes.push(format!(
            "no verdicts: {count} tasks, more than the {MAX_JUDGED} a dump judges (a proof at \
             this size would take the daemon past its memory budget)"
        ));
    } else {
        for i in 0..PROOF_SCANS {
            if i > 0 {
                std::thread::sleep(PROOF_PAUSE);
            }
            if let Scanned::Tasks { tasks, policy, .. } = source.scan(scan_input(Duration::ZERO)) {
                verdicts = tasks
                    .iter()
                    .filter_map(|o| {
                        let TaskState::Parked { wait_reason, .. } = &o.state else {
                            return None;
                        };
                        // As the detector names them: proven by an analysis is a leak;
                        // what nothing can wake keeps its kind (a nil channel is stuck).
                        let never_woken = policy.never_woken(wait_reason).is_some();
                        if !(o.proven || never_woken) || !policy.may_find(&o.entry, wait_reason) {
                            return None;
                        }
                        let leaked = o.proven || policy.classify(wait_reason) != WaitClass::Stuck;
                        policy
                            .finding(wait_reason, leaked)
                            .map(|f| (o.id, policy.kind(f).name))
                    })
                    .collect();
            }
        }
    }
    let mut tasks: Vec<Task> = source
        .dump(proc::monotonic_ns(), options.max_listed, &mut notes)
        .map_err(|source| DumpError::Runtime {
            pid,
            runtime,
            source,
        })?;
    if !proc::stat(pid).is_ok_and(|(state, start)| state != 'Z' && start == start_time) {
        return Err(DumpError::Exited { pid });
    }
    for t in &mut tasks {
        t.verdict = verdicts.get(&t.id).copied();
        t.proven = t.verdict.is_some();
    }
    let task_word = RUNTIMES
        .iter()
        .find(|r| r.name == runtime)
        .map_or("task", |r| r.task_word);
    Ok(Dump {
        process: source.process().clone(),
        task_word,
        taken_unix_ns: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        tasks,
        notes,
    })
}
