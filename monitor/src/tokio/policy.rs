//! How tokio tasks are judged: an idle task (waiting for a wake) is fine however long, a leak
//! when its group only grows; a task with no waker left can never run again; a poll that
//! blocks its worker past the poll threshold stalls every task queued behind it; one polled
//! over and over with no wait and no change burns its worker.

use std::time::Duration;

use super::{IDLE, NO_WAKER};
use crate::detect::{AlertKind, Finding, Policy, Thresholds, WaitClass};

#[derive(Debug)]
pub(crate) struct TokioPolicy;

/// The policy of every tokio snapshot.
pub(crate) static TOKIO: TokioPolicy = TokioPolicy;

impl Policy for TokioPolicy {
    fn runtime(&self) -> &'static str {
        "tokio"
    }

    fn classify(&self, reason: &str) -> WaitClass {
        match reason {
            NO_WAKER => WaitClass::Stuck,
            IDLE => WaitClass::Idle,
            _ => WaitClass::Idle,
        }
    }

    /// tokio spawns no tasks of its own; `spawn_blocking` jobs are not in the walked lists.
    fn is_runtime_task(&self, _entry: &str) -> bool {
        false
    }

    fn never_woken(&self, reason: &str) -> Option<&'static str> {
        (reason == NO_WAKER).then_some("no_waker")
    }

    fn kind(&self, finding: Finding) -> AlertKind {
        match finding {
            Finding::Leak => AlertKind::TaskLeak,
            Finding::Stuck => AlertKind::TaskLostWaker,
        }
    }

    /// One poll that has not returned blocks its worker; polls over and over without a wait
    /// between are a spin.
    fn running(&self, t: &Thresholds, runs: u32) -> Option<(AlertKind, Duration)> {
        match runs {
            0 => None,
            1 => Some((AlertKind::TaskBlocking, t.poll_block)),
            _ => Some((AlertKind::TaskSpinning, t.spin)),
        }
    }
}
