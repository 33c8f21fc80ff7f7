//! Turning task (goroutine, tokio task) and thread observations into alerts. Input is plain
//! data (what the probes and the process memory said at one instant), so every rule here runs
//! on recorded observations in tests without eBPF. Nothing here knows a runtime: each brings
//! its [`Policy`] and its alert kinds.

use std::sync::Arc;

mod alerts;
mod book;
mod due;
mod groups;
mod kinds;
mod policy;
mod rules;
mod threads;

pub(crate) use alerts::Detector;
pub(crate) use book::{Alert, AlertBook, AlertState, Transition};
pub(crate) use due::Due;
pub(crate) use groups::{Field, GroupKey, ObjectState, Site, Stack, ThreadReport, WaitsOn};
pub(crate) use kinds::{Activity, AlertKind, Family, Proof, Severity, alert_kind};
pub(crate) use policy::{Finding, Policy};
pub(crate) use rules::{Thresholds, WaitClass, nanos};
pub(crate) use threads::{
    FutexObs, LockFlavor, THREAD_KINDS, ThreadDetector, ThreadObs, ThreadSnapshot, WaitKind,
};

/// One task (a goroutine, a tokio task) as seen at a scan. Sites and names are shared
/// (`Arc`): thousands of tasks of one group point at the same few.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Observation {
    /// Its id in its runtime (a goroutine id, a tokio task id).
    pub id: u64,
    pub state: TaskState,
    /// Where the statement that created it is (`go` statement).
    pub created_at: Option<Arc<Site>>,
    /// The function it started in (a tokio task's future type).
    pub entry: Arc<str>,
    /// What it waits on, when parked on an object its runtime can read.
    pub waits_on: Option<Arc<WaitsOn>>,
    /// Proven leaked by its runtime (the policy's [`Policy::proof`] says how).
    pub proven: bool,
    /// Its stack, innermost first, when parked (or blocked in a poll).
    pub stack: Option<Stack>,
    /// The thread it blocks, for a task blocking its worker in a poll.
    pub thread: Option<Arc<ThreadReport>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum TaskState {
    /// Parked since `since_ns`, waiting for `wait_reason` at `blocked_at` (first frame in the
    /// program's own code, else the first frame outside the runtime).
    Parked {
        since_ns: u64,
        wait_reason: Arc<str>,
        blocked_at: Option<Arc<Site>>,
    },
    /// Scheduled without parking since `since_ns`, put on a CPU (or polled) `runs` times, last
    /// at `last_run_ns`.
    Running {
        since_ns: u64,
        runs: u32,
        last_run_ns: u64,
    },
}

/// The tasks of one process worth judging at one instant (`now_ns` on the CLOCK_MONOTONIC
/// scale the probes use): those [`Due`] admits, so the detector does not filter them again.
#[derive(Clone, Debug)]
pub(crate) struct Snapshot {
    pub now_ns: u64,
    pub tasks: Vec<Observation>,
    /// How the runtime's tasks are judged.
    pub policy: &'static dyn Policy,
    /// How its last proof read the program's memory (see [`Alert::marking`]).
    pub marking: Option<Arc<str>>,
}

#[cfg(test)]
pub(crate) mod testing;
