//! The budget of the reachability analysis (see `reach.rs`), shared by every process:
//! bytes of target memory read and time spent per minute. Analyses run only while the
//! budget has something left, so proving leaks never costs more than the setting, however
//! large or numerous the heaps.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// CPU time the analyses may take per minute, all processes together: 5% of one core.
const CPU_PER_MINUTE: Duration = Duration::from_secs(3);
/// Minutes of budget that may build up while nothing is analysed; also what one analysis may
/// read at most, so a heap larger than one minute's budget is still analysed, less often.
const BURST_MINUTES: f64 = 4.0;

#[derive(Debug)]
pub(super) struct ReachBudget {
    per_minute: u64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// Bytes and seconds that may still be spent (negative after an analysis overran).
    bytes: f64,
    cpu: f64,
    refilled: Instant,
}

impl ReachBudget {
    /// `per_minute` bytes of target memory per minute; 0 turns the analysis off.
    pub(super) fn new(per_minute: u64) -> Self {
        Self {
            per_minute,
            state: Mutex::new(State {
                bytes: per_minute as f64 * BURST_MINUTES,
                cpu: CPU_PER_MINUTE.as_secs_f64(),
                refilled: Instant::now(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        let mut s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Refill at the rate, up to a few minutes' worth.
        let elapsed = s.refilled.elapsed().as_secs_f64() / 60.0;
        s.refilled = Instant::now();
        let (bytes, cpu) = (self.per_minute as f64, CPU_PER_MINUTE.as_secs_f64());
        s.bytes = (s.bytes + elapsed * bytes).min(bytes * BURST_MINUTES);
        // CPU does not build up past one minute's worth: bursts stay short.
        s.cpu = (s.cpu + elapsed * cpu).min(cpu);
        s
    }

    /// Whether an analysis may start now.
    pub(super) fn allows(&self) -> bool {
        if self.per_minute == 0 {
            return false;
        }
        let s = self.lock();
        s.bytes > 0.0 && s.cpu > 0.0
    }

    /// Bytes one analysis may read: what builds up in a few minutes (it may overdraw what is
    /// left; the next analysis then waits for the refill).
    pub(super) fn limit(&self) -> u64 {
        (self.per_minute as f64 * BURST_MINUTES) as u64
    }

    /// Records what an analysis cost.
    pub(super) fn charge(&self, bytes: u64, cpu: Duration) {
        let mut s = self.lock();
        s.bytes -= bytes as f64;
        s.cpu -= cpu.as_secs_f64();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spending_waits_for_the_refill() {
        let b = ReachBudget::new(1 << 20);
        assert!(b.allows());
        assert_eq!(b.limit(), 4 << 20);
        b.charge(5 << 20, Duration::from_millis(5));
        assert!(!b.allows());
        assert!(!ReachBudget::new(0).allows());
    }
}
