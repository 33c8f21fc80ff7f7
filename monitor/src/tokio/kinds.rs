//! tokio's alert kinds, what proves a task leaked, and how tasks are counted.

use crate::{
    detect::{Activity, AlertKind, Family, Proof, Severity, alert_kind},
    runtime::CountMetric,
};

pub(crate) static TASK_LEAK: AlertKind = alert_kind!("task_leak",
    members: "tasks",
    activity: Activity::Blocked,
    severity: Severity::Warn,
    family: Family::Task,
    hint: "tasks of this future type pile up waiting for a wake that never comes (a channel or \
           oneshot nobody completes): drop or complete every sender, wrap the await in \
           tokio::time::timeout or select! on a CancellationToken, and bound spawning with a \
           Semaphore or a JoinSet",
    running: AlertKind::RUNNING,
    running_at: false,
);

pub(crate) static TASK_LOST_WAKER: AlertKind = alert_kind!("task_lost_waker",
    members: "tasks",
    activity: Activity::Blocked,
    severity: Severity::Warn,
    family: Family::Task,
    hint: "tasks are pending with no waker left, so nothing can ever wake them: a hand-written \
           Future returned Poll::Pending without storing cx.waker() (or dropped it); store the \
           waker and wake it when ready, or abort the tasks (JoinHandle::abort)",
    running: AlertKind::RUNNING,
    running_at: false,
);

pub(crate) static TASK_BLOCKING: AlertKind = alert_kind!("task_blocking",
    members: "tasks",
    activity: Activity::Blocked,
    severity: Severity::Warn,
    family: Family::Task,
    hint: "a poll blocks its worker thread, stalling every task queued on it: move blocking \
           calls (std::thread::sleep, std::sync::Mutex held across slow work, blocking I/O, long \
           computations) to tokio::task::spawn_blocking, or use tokio::time::sleep and \
           tokio::sync::Mutex",
    running: "in one poll",
    running_at: true,
);

pub(crate) static TASK_SPINNING: AlertKind = alert_kind!("task_spinning",
    members: "tasks",
    activity: Activity::Spinning,
    severity: Severity::Warn,
    family: Family::Task,
    hint: "a task is polled over and over without waiting or changing: it yields (yield_now) \
           or wakes itself (cx.waker().wake_by_ref()) while polling a condition that does not \
           come, burning its worker; await what it waits for instead (a Notify, a channel, a \
           watch), or back off with tokio::time::sleep or interval; give the loop an exit \
           (a CancellationToken)",
    running: "polled over and over without waiting",
    running_at: false,
);

pub(crate) static KINDS: &[&AlertKind] =
    &[&TASK_LEAK, &TASK_LOST_WAKER, &TASK_BLOCKING, &TASK_SPINNING];

/// Idle with no waker left and not scheduled: nothing can wake them.
pub(crate) static NO_WAKER: Proof = Proof {
    name: "no_waker",
    text: "{n} of them hold no waker and are not scheduled: nothing can wake them",
    summary: "no waker is left to wake them",
};

/// tokio has no semantic convention of its own: leakmon's name.
pub(crate) static TASKS: CountMetric = CountMetric {
    name: "leakmon.tokio.task.count",
    unit: "{task}",
    description: "tokio tasks of a process, by state (running, scheduled, idle; idle with no \
                  waker left)",
};
