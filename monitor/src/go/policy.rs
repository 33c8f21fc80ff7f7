//! How Go's waits and goroutines are judged.

use std::time::Duration;

use super::kinds::{
    GOROUTINE_LEAK, GOROUTINE_SPINNING, GOROUTINE_STUCK, UNREACHABLE, hint_for_wait,
};
use crate::detect::{AlertKind, Finding, Policy, Proof, Thresholds, WaitClass};

#[derive(Debug)]
pub(crate) struct GoPolicy;

/// The policy of every Go snapshot.
pub(crate) static GO: GoPolicy = GoPolicy;

impl Policy for GoPolicy {
    fn classify(&self, reason: &str) -> WaitClass {
        classify_wait(reason)
    }

    /// The runtime's own goroutines (GC workers, sweeper, finalizers, ...); not the main
    /// goroutine, whose entry is `runtime.main` but which runs the program's `main`.
    fn is_runtime_task(&self, entry: &str) -> bool {
        entry.starts_with("runtime.") && !self.is_main_task(entry)
    }

    fn is_main_task(&self, entry: &str) -> bool {
        entry == "runtime.main"
    }

    fn is_lock_wait(&self, reason: &str) -> bool {
        matches!(
            reason,
            "sync.Mutex.Lock" | "sync.RWMutex.Lock" | "sync.RWMutex.RLock"
        )
    }

    /// Proven goroutines: two reachability analyses in a row found nothing live can reach
    /// what they wait on.
    fn proof(&self) -> Option<&'static Proof> {
        Some(&UNREACHABLE)
    }

    /// Nothing can ever wake a nil channel or an empty select: their proof needs no
    /// analysis.
    fn never_woken(&self, reason: &str) -> Option<&'static Proof> {
        matches!(
            reason,
            "chan send (nil chan)" | "chan receive (nil chan)" | "select (no cases)"
        )
        .then_some(&UNREACHABLE)
    }

    fn kind(&self, finding: Finding) -> &'static AlertKind {
        match finding {
            Finding::Leak => &GOROUTINE_LEAK,
            Finding::Stuck => &GOROUTINE_STUCK,
        }
    }

    /// Rescheduled after preemption: a loop that never parks. Run once: a long system call.
    fn running(&self, t: &Thresholds, runs: u32) -> Option<(&'static AlertKind, Duration)> {
        (runs >= 2).then_some((&GOROUTINE_SPINNING, t.spin))
    }

    /// A blocked group's wait says what to do (send on a channel nobody receives from: a
    /// buffer, or ctx.Done()); a spinning one's is the kind's.
    fn hint(&self, kind: &'static AlertKind, wait_reason: Option<&str>) -> &'static str {
        if *kind == GOROUTINE_SPINNING {
            return kind.hint;
        }
        wait_reason.and_then(hint_for_wait).unwrap_or(kind.hint)
    }
}

/// Classifies a wait reason as Go names it (`runtime.waitReasonStrings`), stable across the
/// versions whose numbering differs.
fn classify_wait(reason: &str) -> WaitClass {
    match reason {
        "sync.Mutex.Lock"
        | "sync.RWMutex.Lock"
        | "sync.RWMutex.RLock"
        | "chan send (nil chan)"
        | "chan receive (nil chan)"
        | "select (no cases)" => WaitClass::Stuck,
        r if r.starts_with("GC")
            || r.starts_with("force gc")
            || r.starts_with("finalizer")
            || r.starts_with("timer goroutine")
            || r.starts_with("trace ")
            || r.starts_with("wait for debug call")
            || r.starts_with("debug call")
            || r.starts_with("preempted")
            || r.starts_with("cleanup wait")
            || r.starts_with("synctest") =>
        {
            WaitClass::Runtime
        }
        _ => WaitClass::Idle,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_classes() {
        assert_eq!(classify_wait("chan send"), WaitClass::Idle);
        assert_eq!(classify_wait("IO wait"), WaitClass::Idle);
        assert_eq!(classify_wait("sync.Mutex.Lock"), WaitClass::Stuck);
        assert_eq!(classify_wait("semacquire"), WaitClass::Idle);
        assert_eq!(classify_wait("sync.WaitGroup.Wait"), WaitClass::Idle);
        assert_eq!(classify_wait("sync.Cond.Wait"), WaitClass::Idle);
        assert_eq!(classify_wait("chan receive (nil chan)"), WaitClass::Stuck);
        assert_eq!(classify_wait("GC worker (idle)"), WaitClass::Runtime);
        assert_eq!(classify_wait("finalizer wait"), WaitClass::Runtime);
    }
}
