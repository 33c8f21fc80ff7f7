//! What differs between runtimes when their tasks are judged: which waits are idle, which
//! tasks are the runtime's own, what a finding is called and how it is remedied. Each runtime
//! supplies one with its snapshots; the detector itself knows no runtime.

use std::time::Duration;

use super::{AlertKind, Proof, Thresholds, WaitClass};

/// What the detector found about a group, before the runtime names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Finding {
    /// Idle members that only grow, or proven leaked.
    Leak,
    /// Members waiting past the threshold on what is not an idle wait.
    Stuck,
}

pub(crate) trait Policy: Send + Sync + std::fmt::Debug {
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
    /// What proves members the runtime marks proven ([`super::Observation::proven`]).
    fn proof(&self) -> Option<&'static Proof> {
        None
    }
    /// For a wait nothing can ever end: its proof.
    fn never_woken(&self, reason: &str) -> Option<&'static Proof>;
    /// The alert kind of a finding.
    fn kind(&self, finding: Finding) -> &'static AlertKind;
    /// What a member running without waiting becomes, and past how long, by how many times it
    /// was put on a CPU (or polled) meanwhile: a goroutine run once sits in a system call, a
    /// tokio poll that ran once blocks its worker, many runs are a loop. None: not a finding.
    fn running(&self, t: &Thresholds, runs: u32) -> Option<(&'static AlertKind, Duration)>;
    /// The remedy for an alert of `kind` whose members wait for `wait_reason`.
    fn hint(&self, kind: &'static AlertKind, _wait_reason: Option<&str>) -> &'static str {
        kind.hint
    }
    /// What a blocked group waiting for `reason` is: leaked (proven by an analysis, or
    /// growing) is a leak whatever the wait, a lock never released among them; otherwise a
    /// wait classed stuck is stuck, and the rest is nothing yet.
    fn finding(&self, reason: &str, leaked: bool) -> Option<Finding> {
        if leaked {
            Some(Finding::Leak)
        } else {
            (self.classify(reason) == WaitClass::Stuck).then_some(Finding::Stuck)
        }
    }
    /// Whether tasks started at `entry` waiting for `reason` may be a finding at all: not the
    /// runtime's own, and not the main task waiting its whole life (Go's main in `select{}`
    /// or `wg.Wait()` on lifetime workers), where only a lock it never gets is one.
    fn may_find(&self, entry: &str, reason: &str) -> bool {
        self.classify(reason) != WaitClass::Runtime
            && !self.is_runtime_task(entry)
            && (!self.is_main_task(entry) || self.is_lock_wait(reason))
    }
}
