//! Every task of the process now, for `leakmon dump`: walked from the runtimes' task lists as
//! scans walk them, each named by its future's type, with its state, how long it has been
//! idle and whether a waker is left to wake it.

use std::sync::Arc;

use super::{IDLE, LOST, TokioTarget, layout, walk::TaskRec};
use crate::{detect::GroupKey, dump::Task};

impl TokioTarget {
    pub(super) fn dump_tasks(&self, now_ns: u64, tasks: &[TaskRec]) -> Vec<Task> {
        let unknown: Arc<str> = Arc::from("?");
        let (idle, lost): (Arc<str>, Arc<str>) = (IDLE.into(), LOST.into());
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            let h = &t.header;
            if h.state & layout::COMPLETE != 0 {
                continue;
            }
            let is_idle = h.is_idle();
            let state = if h.state & layout::RUNNING != 0 {
                "running"
            } else if h.state & layout::NOTIFIED != 0 {
                "scheduled"
            } else {
                "idle"
            };
            let waiting_ns = self
                .idle
                .get(&t.id)
                .filter(|i| is_idle && i.signature == t.signature)
                .map(|i| now_ns.saturating_sub(i.since_ns));
            let wait_reason = is_idle.then(|| {
                if h.waker_lost() {
                    Arc::clone(&lost)
                } else {
                    Arc::clone(&idle)
                }
            });
            let entry = Arc::clone(self.names.get(&h.vtable).unwrap_or(&unknown));
            // As the detector groups idle tasks: by future type and wait.
            let group = wait_reason.as_ref().map(|r| GroupKey {
                created_at: None,
                entry: Arc::clone(&entry),
                blocked_at: None,
                wait_reason: Some(Arc::clone(r)),
            });
            out.push(Task {
                id: t.id,
                state,
                wait_reason,
                waiting_ns,
                entry,
                stack: Arc::from([]),
                created_by: None,
                waits_on: None,
                verdict: None,
                proven: false,
                waker: is_idle.then_some(if h.waker_lost() { "none" } else { "registered" }),
                group,
                thread: None,
            });
        }
        out
    }
}
