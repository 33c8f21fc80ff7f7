//! How tokio tasks are judged: an idle task (waiting for a wake) is fine however long, a leak
//! when its group only grows; a task with no waker left can never run again; a poll that
//! blocks its worker past the poll threshold stalls every task queued behind it; one polled
//! over and over with no wait and no change burns its worker.

use std::time::Duration;

use super::{
    IDLE,
    kinds::{NO_WAKER, TASK_BLOCKING, TASK_LEAK, TASK_LOST_WAKER, TASK_SPINNING},
};
use crate::detect::{AlertKind, Finding, Policy, Proof, Thresholds, WaitClass};

#[derive(Debug)]
pub(crate) struct TokioPolicy;

/// The policy of every tokio snapshot.
pub(crate) static TOKIO: TokioPolicy = TokioPolicy;

impl Policy for TokioPolicy {
    fn classify(&self, reason: &str) -> WaitClass {
        match reason {
            super::LOST => WaitClass::Stuck,
            IDLE => WaitClass::Idle,
            _ => WaitClass::Idle,
        }
    }

    /// tokio spawns no tasks of its own; `spawn_blocking` jobs are not in the walked lists.
    fn is_runtime_task(&self, _entry: &str) -> bool {
        false
    }

    fn never_woken(&self, reason: &str) -> Option<&'static Proof> {
        (reason == super::LOST).then_some(&NO_WAKER)
    }

    fn kind(&self, finding: Finding) -> &'static AlertKind {
        match finding {
            Finding::Leak => &TASK_LEAK,
            Finding::Stuck => &TASK_LOST_WAKER,
        }
    }

    /// One poll that has not returned blocks its worker; polls over and over without a wait
    /// between are a spin.
    fn running(&self, t: &Thresholds, runs: u32) -> Option<(&'static AlertKind, Duration)> {
        match runs {
            0 => None,
            1 => Some((&TASK_BLOCKING, t.poll_block)),
            _ => Some((&TASK_SPINNING, t.spin)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::{Detector, Due, Observation, Snapshot, TaskState};

    const S: u64 = 1_000_000_000;

    fn thresholds() -> Thresholds {
        Thresholds::for_tests()
    }

    /// The same rules under tokio's policy: kinds named for tasks, a lost waker is proven
    /// on sight, a poll blocking once past the poll threshold is a finding, and an idle task
    /// that stays (an accept loop) is never one.
    #[test]
    fn tokio_policy_names_task_findings() {
        // What the source hands the detector: the tasks `Due` admits.
        let tokio = |now: u64, tasks: Vec<Observation>| {
            let due = Due {
                now_ns: now * S,
                thresholds: thresholds(),
            };
            Snapshot {
                now_ns: now * S,
                tasks: tasks
                    .into_iter()
                    .filter(|o| due.admits(&TOKIO, o))
                    .collect(),
                policy: &TOKIO,
                marking: None,
            }
        };
        let task = |id: u64, reason: &str| Observation {
            id,
            state: TaskState::Parked {
                since_ns: 0,
                wait_reason: reason.into(),
                blocked_at: None,
            },
            created_at: None,
            entry: "app::handler".into(),
            waits_on: None,
            proven: false,
            stack: None,
            thread: None,
        };
        let mut d = Detector::new(thresholds());
        // Idle for long, not growing: silent.
        assert!(d.observe(1, &tokio(30, vec![task(1, "idle")])).is_empty());
        let lost = d.observe(
            2,
            &tokio(30, vec![task(1, "no waker"), task(2, "no waker")]),
        );
        assert_eq!(lost[0].alert.kind, &TASK_LOST_WAKER);
        assert_eq!(
            (lost[0].alert.proof.map(|p| p.name), lost[0].alert.proven),
            (Some("no_waker"), 2)
        );
        let poll = Observation {
            state: TaskState::Running {
                since_ns: 29 * S,
                runs: 1,
                last_run_ns: 30 * S,
            },
            ..task(3, "idle")
        };
        let blocking = d.observe(3, &tokio(30, vec![poll.clone()]));
        assert_eq!(blocking[0].alert.kind, &TASK_BLOCKING);
        // Under the threshold (500 ms): not yet.
        let short = Observation {
            state: TaskState::Running {
                since_ns: 30 * S - S / 10,
                runs: 1,
                last_run_ns: 30 * S,
            },
            ..poll.clone()
        };
        assert!(d.observe(4, &tokio(30, vec![short])).is_empty());
        // Polled over and over: a spin, judged against the spin threshold (3 s here).
        let spin = |since: u64| Observation {
            state: TaskState::Running {
                since_ns: since * S,
                runs: 50_000,
                last_run_ns: 30 * S,
            },
            ..poll.clone()
        };
        assert!(d.observe(5, &tokio(30, vec![spin(28)])).is_empty());
        let spinning = d.observe(6, &tokio(30, vec![spin(26)]));
        assert_eq!(spinning[0].alert.kind, &TASK_SPINNING);
    }
}
