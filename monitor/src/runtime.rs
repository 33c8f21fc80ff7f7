//! The seam between the watch loop and the runtimes. Each runtime (`go`, `tokio`) inspects a
//! process into a [`TaskSource`]; each scan asks it, on a worker, for a snapshot of its tasks,
//! judged by the runtime's [`Policy`](crate::detect::Policy). The loop, the detector and the
//! outputs know no runtime. (Threads, which every process has, are watched beside this.)

use std::collections::HashMap;

use monitor_ebpf::GoState;

use crate::detect::{Observation, Policy, Thresholds};

/// What a scan gives every source.
pub struct ScanInput {
    /// When the scan was taken (CLOCK_MONOTONIC).
    pub now_ns: u64,
    pub thresholds: Thresholds,
    /// The probes' records of this process (Go's goroutine table in the kernel), by task id.
    pub records: HashMap<u64, GoState>,
}

/// What a source's scan gives back.
pub enum Scanned {
    /// The tasks to judge, and probe records found stale (to drop from the kernel's table).
    Tasks {
        observations: Vec<Observation>,
        stale: Vec<(u64, GoState)>,
        policy: &'static dyn Policy,
    },
    /// Nothing to judge this time (a walk raced with the program): alerts stay as they are.
    NotJudged,
    /// The process runs another program now (an exec): inspect it again.
    OtherProgram,
}

/// A watched process's tasks, as one runtime sees them.
pub trait TaskSource: Send {
    /// One scan, on a worker (it reads what the target controls).
    fn scan(&mut self, input: ScanInput) -> Scanned;
}
