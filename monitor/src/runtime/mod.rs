//! The seam between the watch loop and the runtimes. Each runtime (`go/`, `tokio/`) is one
//! folder that exposes one [`Entry`], listed in [`registry`]: it recognises programs that run
//! it, inspects each such process into a [`TaskSource`], attaches what probes it needs, and
//! turns its tasks into runtime-neutral observations judged by its [`Policy`], with alert kinds
//! of its own. The loop, the detector, the sinks and the CLI iterate over the registry and name
//! no runtime. (OS threads, which every process has, are watched beside this, in `threads/`.)

mod binaries;
mod combined;
pub(crate) mod registry;

use std::{collections::BTreeMap, fs::File, path::Path, path::PathBuf, sync::Arc};

use serde::Serialize;

pub(crate) use self::binaries::{Binaries, InspectError, Inspected};
use crate::{
    bpf::{BpfError, Links, Probes, TaskRecords},
    detect::{AlertKind, Due, Observation, Policy},
    dump::task::Task,
    proc::{BinaryKey, Container, Library},
    threads::symbols::Symbolizer,
};

/// What a runtime says went wrong reading a program or a process (its own error types, boxed:
/// the loop only reports them).
pub(crate) type RuntimeError = Box<dyn std::error::Error + Send + Sync>;

/// A runtime, as the registry lists it.
pub(crate) struct Entry {
    /// Its name in alerts and exports (`process.runtime.name`): "go", "tokio".
    pub name: &'static str,
    /// How logs name its programs: "Go", "tokio".
    pub title: &'static str,
    /// What its tasks are called in dumps: "goroutine", "task".
    pub task_word: &'static str,
    /// Its alert kinds.
    pub kinds: &'static [&'static AlertKind],
    /// The metric its processes' task counts are exported as.
    pub count: &'static CountMetric,
    /// Starts it for one monitor, with the settings and caches it shares.
    pub start: fn(&Context) -> Arc<dyn Runtime>,
}

/// What a runtime may take from the monitor that starts it.
pub(crate) struct Context {
    /// Go versions newer than the last validated one are watched.
    pub unvalidated: bool,
    /// Every park probed instead of the goroutine table scanned.
    pub probe_parks: bool,
    /// Bytes of target memory proofs may read per minute (0: no proofs).
    pub reach_budget: u64,
    pub symbolizer: Symbolizer,
}

/// One runtime, started: recognises its programs and inspects their processes. Shared with
/// the workers that inspect processes.
pub(crate) trait Runtime: Send + Sync {
    fn entry(&self) -> &'static Entry;
    /// What a program that does not run it is, said when no runtime recognises one
    /// ("not a Go executable").
    fn absent(&self) -> &'static str;
    /// Whether it is looked for in the shared libraries a process maps, when its executable
    /// runs no runtime (a Rust library loaded by Python or C).
    fn in_libraries(&self) -> bool {
        false
    }
    /// Reads an executable or a library (untrusted: on a worker, with a deadline). Ok(None)
    /// when it does not run this runtime.
    fn recognise(&self, file: &File, path: &Path)
    -> Result<Option<Arc<dyn Program>>, RuntimeError>;
}

/// A program a runtime recognised, shared by every process that runs it.
pub(crate) trait Program: Send + Sync {
    /// Inspects a process that runs it (its memory, its tasks' code). Ok(None) when it runs
    /// none of the runtime (yet): watched as a plain process, looked at again later.
    fn inspect(&self, process: &Process) -> Result<Option<Box<dyn TaskSource>>, RuntimeError>;
    /// Whether a watched process still uses it (else the cache lets it go).
    fn in_use(&self) -> bool;
}

/// A process about to be inspected.
#[derive(Clone, Debug)]
pub(crate) struct Process {
    pub pid: u32,
    /// The runtime that recognised it (`Entry::name`).
    pub runtime: &'static str,
    pub key: BinaryKey,
    pub exe: PathBuf,
    /// The shared library the runtime is in, when not the executable.
    pub library: Option<Library>,
}

/// The process an alert is about, as alerts and exports name it.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct ProcessInfo {
    pub pid: u32,
    pub exe: String,
    pub runtime: &'static str,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub runtime_version: String,
    #[serde(flatten)]
    pub container: Container,
}

impl ProcessInfo {
    /// `process`, as its runtime's alerts name it (its container read from /proc: on a
    /// worker).
    pub(crate) fn of(process: &Process, runtime_version: String) -> Self {
        Self {
            pid: process.pid,
            exe: process.exe.display().to_string(),
            runtime: process.runtime,
            runtime_version,
            container: crate::proc::container_of(process.pid),
        }
    }
}

/// How many tasks a process has, by state and wait reason, at one scan: what a dashboard's
/// task count curve is drawn from (the NumGoroutine curve of every Go process, with no code in
/// any of them).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Census {
    /// The metric the counts are exported as.
    pub metric: &'static CountMetric,
    /// (state, wait reason or "") -> tasks.
    pub counts: BTreeMap<(&'static str, Arc<str>), u64>,
}

/// A runtime's task count metric, named after the OpenTelemetry semantic conventions where
/// one exists (`go.goroutine.count`).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct CountMetric {
    pub name: &'static str,
    pub unit: &'static str,
    pub description: &'static str,
}

impl Census {
    pub(crate) fn new(metric: &'static CountMetric) -> Self {
        Self {
            metric,
            counts: BTreeMap::new(),
        }
    }

    pub(crate) fn add_n(&mut self, state: &'static str, reason: &Arc<str>, n: u64) {
        *self.counts.entry((state, Arc::clone(reason))).or_default() += n;
    }

    pub(crate) fn total(&self) -> u64 {
        self.counts.values().sum()
    }
}

/// What a scan gives every source.
pub(crate) struct ScanInput {
    /// When the scan was taken (CLOCK_MONOTONIC), and which tasks are worth judging then.
    pub due: Due,
    /// What the runtime's probes recorded of this process's tasks, by task id.
    pub records: TaskRecords,
}

/// What a source's scan gives back.
pub(crate) enum Scanned {
    /// The tasks to judge (those `ScanInput::due` admits), and probe records found stale (to
    /// drop from the kernel's table).
    Tasks {
        tasks: Vec<Observation>,
        stale: TaskRecords,
        policy: &'static dyn Policy,
        /// Every task, counted (when the source saw them all).
        census: Option<Census>,
        /// How the runtime's last proof read the program's memory, for alerts it proves
        /// ("stacks by their stack maps, ...").
        marking: Option<Arc<str>>,
    },
    /// Nothing to judge this time (a walk raced with the program): alerts stay as they are.
    NotJudged,
    /// The process runs another program now (an exec): inspect it again.
    OtherProgram,
}

/// A watched process's tasks, as one runtime sees them. Attached on the loop, then scanned on
/// workers.
pub(crate) trait TaskSource: Send {
    fn process(&self) -> &ProcessInfo;
    /// The process's start time (PIDs are reused).
    fn start_time(&self) -> u64;
    /// On the loop, once: attaches the probes it needs. The links are held by the loop, so
    /// detaching never waits for a worker.
    fn attach(&mut self, _probes: &mut Probes) -> Result<Option<Links>, BpfError> {
        Ok(None)
    }
    /// One scan, on a worker (it reads what the target controls).
    fn scan(&mut self, input: ScanInput) -> Scanned;
    /// Every task of the process now, at most `limit` (the rest counted in a note), for a
    /// dump (on a worker; `now_ns` on the probes' clock), with what the dump could not tell
    /// added to `notes`. Verdicts are left to the caller, which has the scans.
    fn dump(
        &mut self,
        now_ns: u64,
        limit: usize,
        notes: &mut Vec<String>,
    ) -> Result<Vec<Task>, RuntimeError>;
}
