//! What differs between runtimes when their tasks are judged: which waits are idle, which
//! tasks are the runtime's own, what a finding is called. Each runtime supplies one with its
//! snapshots (`go::GO`, `tokio::TOKIO`); the detector itself knows no runtime.

use std::time::Duration;

use super::{AlertKind, Thresholds, WaitClass};

/// What the detector found about a group, before the runtime names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finding {
    /// Idle members that only grow, or proven leaked.
    Leak,
    /// Members waiting past the threshold on what is not an idle wait.
    Stuck,
}

pub trait Policy: Send + Sync + std::fmt::Debug {
    /// The runtime's name in alerts ("go", "tokio").
    fn runtime(&self) -> &'static str;
    /// How a wait reads when it lasts.
    fn classify(&self, reason: &str) -> WaitClass;
    /// The runtime's own tasks: never reported.
    fn is_runtime_task(&self, entry: &str) -> bool;
    /// The program's main task, which may wait its whole life: only a lock wait is a finding
    /// there.
    fn is_main_task(&self, _entry: &str) -> bool {
        false
    }
    fn is_lock_wait(&self, _reason: &str) -> bool {
        false
    }
    /// For a wait nothing can ever end: the proof's name.
    fn never_woken(&self, reason: &str) -> Option<&'static str>;
    /// The alert kind of a finding.
    fn kind(&self, finding: Finding) -> AlertKind;
    /// What a member running without waiting becomes, and past how long, by how many times it
    /// was put on a CPU (or polled) meanwhile: a goroutine run once sits in a system call, a
    /// tokio poll that ran once blocks its worker, many runs are a loop. None: not a finding.
    fn running(&self, t: &Thresholds, runs: u32) -> Option<(AlertKind, Duration)>;
}
