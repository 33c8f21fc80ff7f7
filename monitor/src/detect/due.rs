//! Which tasks are due for judging: the one place the thresholds admit a task.

use super::{AlertKind, Policy, Thresholds, nanos};

/// Which tasks are worth judging at one instant: parked past the block threshold, or running
/// past what the runtime's policy sets for how often they ran. The one place the thresholds
/// admit a task; sources apply it where it is cheapest (before reading a task's stack), and
/// the detector takes what they give.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Due {
    pub now_ns: u64,
    pub thresholds: Thresholds,
}

impl Due {
    /// Parked (idle) since `since_ns`.
    pub(crate) fn parked(&self, since_ns: u64) -> bool {
        self.now_ns.saturating_sub(since_ns) >= nanos(self.thresholds.block)
    }

    /// Running since `since_ns`, put on a CPU (or polled) `runs` times: the kind it is, once
    /// past the threshold `policy` sets for that.
    pub(crate) fn running(
        &self,
        policy: &dyn Policy,
        since_ns: u64,
        runs: u32,
    ) -> Option<&'static AlertKind> {
        let (kind, after) = policy.running(&self.thresholds, runs)?;
        (self.now_ns.saturating_sub(since_ns) >= nanos(after)).then_some(kind)
    }

    /// Whether an observation is one to judge (as a source decides it, for tests that build
    /// snapshots by hand).
    #[cfg(test)]
    pub(crate) fn admits(&self, policy: &dyn Policy, o: &super::Observation) -> bool {
        match o.state {
            super::TaskState::Parked { since_ns, .. } => self.parked(since_ns),
            super::TaskState::Running { since_ns, runs, .. } => {
                self.running(policy, since_ns, runs).is_some()
            }
        }
    }
}
