//! Go's alert kinds, what proves a goroutine leaked, and how goroutines are counted.

use crate::{
    detect::{Activity, AlertKind, Family, Proof, Severity, alert_kind},
    runtime::CountMetric,
};

pub(crate) static GOROUTINE_LEAK: AlertKind = alert_kind!("goroutine_leak",
    members: "goroutines",
    activity: Activity::Blocked,
    severity: Severity::Warn,
    family: Family::Task,
    hint: "goroutines are created faster than they finish: bound concurrency with a worker pool \
           or a semaphore (buffered channel), and give each one a way to exit (context \
           cancellation, timeouts)",
    running: AlertKind::RUNNING,
    running_at: false,
);

pub(crate) static GOROUTINE_STUCK: AlertKind = alert_kind!("goroutine_stuck",
    members: "goroutines",
    activity: Activity::Blocked,
    severity: Severity::Warn,
    family: Family::Task,
    hint: "goroutines have waited past the threshold: give the wait a timeout or a \
           context.Context so it can be cancelled",
    running: AlertKind::RUNNING,
    running_at: false,
);

pub(crate) static GOROUTINE_SPINNING: AlertKind = alert_kind!("goroutine_spinning",
    members: "goroutines",
    activity: Activity::Spinning,
    severity: Severity::Warn,
    family: Family::Task,
    hint: "a loop never blocks or exits: give it an exit condition (check ctx.Done() or a quit \
           channel each iteration) and wait on a channel, sync.Cond or time.Ticker instead of \
           busy-waiting",
    running: AlertKind::RUNNING,
    running_at: false,
);

pub(crate) static KINDS: &[&AlertKind] = &[&GOROUTINE_LEAK, &GOROUTINE_STUCK, &GOROUTINE_SPINNING];

/// Nothing live can reach what they wait on: two reachability analyses in a row agreed, or
/// the wait is one nothing can ever end (a nil channel, an empty select).
pub(crate) static UNREACHABLE: Proof = Proof {
    name: "unreachable",
    text: "nothing live can reach what {n} of them wait on",
    summary: "nothing live can reach what they wait on",
};

/// The remedy for goroutines blocked on `wait_reason`, where the wait says more than the kind.
pub(crate) fn hint_for_wait(wait_reason: &str) -> Option<&'static str> {
    Some(match wait_reason {
        "chan send" => {
            "goroutines block sending on a channel nobody receives from: give the channel a buffer \
             for results that may be abandoned (make(chan T, 1)), or select on ctx.Done() beside \
             the send so the sender can give up"
        }
        "chan receive" => {
            "goroutines wait on a channel that is never closed or sent to: close it when the \
             producer is done (defer close(ch)) so range loops end, or select on ctx.Done() to \
             cancel the receiver"
        }
        "select" => {
            "goroutines wait in a select whose channels never fire: add a case <-ctx.Done() \
             (context cancellation) or a timeout (time.After / context.WithTimeout)"
        }
        "IO wait" => {
            "goroutines wait on network I/O with no deadline: set deadlines (SetReadDeadline, \
             http.Server timeouts) or use context-aware calls, and close idle connections"
        }
        "sync.Mutex.Lock" | "sync.RWMutex.Lock" | "sync.RWMutex.RLock" => {
            "goroutines wait on a lock that is never released: pair every Lock with an Unlock \
             (defer mu.Unlock()), keep lock order consistent, and never hold a lock across a \
             blocking call"
        }
        "sync.WaitGroup.Wait" | "semacquire" => {
            "goroutines wait on a WaitGroup or semaphore that never reaches zero: call wg.Done() \
             on every path (defer wg.Done()) and wg.Add before each go statement; add a timeout \
             or context around the wait"
        }
        "sync.Cond.Wait" => {
            "goroutines wait on a sync.Cond that is never signalled: Signal/Broadcast after every \
             state change, or replace it with a channel and context cancellation"
        }
        "chan send (nil chan)" | "chan receive (nil chan)" => {
            "goroutines block on a nil channel, which is never ready: make() the channel before \
             use (a nil channel in a select disables that case forever)"
        }
        "select (no cases)" => {
            "an empty select{} blocks forever: wait on a context or a signal channel instead"
        }
        _ => return None,
    })
}

/// OpenTelemetry's semantic convention for the Go runtime's goroutine count.
pub(crate) static GOROUTINES: CountMetric = CountMetric {
    name: "go.goroutine.count",
    unit: "{goroutine}",
    description: "Goroutines of a Go process, by state and wait reason (the count \
                  runtime.NumGoroutine gives: the runtime's own are left out)",
};
