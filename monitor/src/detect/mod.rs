//! Turning task (goroutine, tokio task) and thread observations into alerts. Input is plain data (what the probes and the
//! process memory said at one instant), so every rule here runs on recorded observations in
//! tests without eBPF.

use std::sync::Arc;

mod alerts;
mod book;
mod groups;
mod hints;
mod policy;
mod rules;
mod threads;

pub use alerts::{Alert, AlertKind, AlertState, Detector, Transition};
pub use book::AlertBook;
pub use groups::{ChannelState, GroupKey, Site, Stack, WaitsOn};
pub use hints::hint;
pub use policy::{Finding, Policy};
pub use rules::{Thresholds, WaitClass};
pub use threads::{
    FutexObs, LockFlavor, ThreadDetector, ThreadObs, ThreadReport, ThreadSnapshot, WaitKind,
};

/// One goroutine as seen at a scan. Sites and names are shared (`Arc`): thousands of
/// goroutines of one group point at the same few.
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    pub goid: u64,
    pub state: TaskState,
    /// Where the `go` statement that created it is.
    pub created_at: Option<Arc<Site>>,
    /// The function it started in.
    pub entry: Arc<str>,
    /// What it waits on, when parked on a channel, a semaphore or a Cond past the block
    /// threshold.
    pub waits_on: Option<Arc<WaitsOn>>,
    /// Two analyses in a row found that nothing live can reach what it waits on.
    pub proven: bool,
    /// Its stack, innermost first, when parked (or blocked in a poll).
    pub stack: Option<Stack>,
    /// The thread it blocks, for a task blocking its worker in a poll.
    pub thread: Option<Arc<ThreadReport>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskState {
    /// Parked since `since_ns`, waiting for `wait_reason` at `blocked_at` (first frame in the
    /// program's own code, else the first frame outside the runtime).
    Parked {
        since_ns: u64,
        wait_reason: Arc<str>,
        blocked_at: Option<Arc<Site>>,
    },
    /// Scheduled without parking since `since_ns`, put on a CPU `runs` times, last at
    /// `last_run_ns`.
    Running {
        since_ns: u64,
        runs: u32,
        last_run_ns: u64,
    },
}

/// All the goroutines of one process worth judging at one instant (`now_ns` on the
/// CLOCK_MONOTONIC scale the probes use).
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub now_ns: u64,
    pub goroutines: Vec<Observation>,
    /// How the runtime's tasks are judged.
    pub policy: &'static dyn Policy,
}
