//! The remedy each alert points to.

use super::AlertKind;

/// A one-line remedy for an alert of `kind` whose goroutines wait for `wait_reason`.
pub fn hint(kind: AlertKind, wait_reason: Option<&str>) -> &'static str {
    match (kind, wait_reason.unwrap_or_default()) {
        (AlertKind::ThreadDeadlock, _) => {
            "threads hold locks while waiting for each other's: take locks in one global order \
             (or all at once, e.g. std::scoped_lock), never call out while holding a lock, or use \
             pthread_mutex_timedlock and back off"
        }
        (AlertKind::ThreadStuck, _) => {
            "threads wait on a lock that is never released: make sure every path unlocks (RAII \
             guards, pthread_cleanup_push), keep lock order consistent, and bound waits with a \
             timed lock"
        }
        (AlertKind::ThreadLeak, _) => {
            "threads are started faster than they finish and stay blocked: use a fixed-size \
             thread pool or a semaphore to bound them, join or detach every thread, and give \
             blocked threads a way out (timeouts, cancellation, closing what they wait on)"
        }
        (AlertKind::ProcessHung, _) => {
            "every thread is blocked and at least one waits on a lock: the process cannot make \
             progress; look for a lock cycle or a lock held by a thread that exited, and restart \
             it after taking a core dump (gcore) for diagnosis"
        }
        (AlertKind::TaskLeak, _) => {
            "tasks of this future type pile up waiting for a wake that never comes (a channel or \
             oneshot nobody completes): drop or complete every sender, wrap the await in \
             tokio::time::timeout or select! on a CancellationToken, and bound spawning with a \
             Semaphore or a JoinSet"
        }
        (AlertKind::TaskLostWaker, _) => {
            "tasks are pending with no waker left, so nothing can ever wake them: a hand-written \
             Future returned Poll::Pending without storing cx.waker() (or dropped it); store the \
             waker and wake it when ready, or abort the tasks (JoinHandle::abort)"
        }
        (AlertKind::TaskBlocking, _) => {
            "a poll blocks its worker thread, stalling every task queued on it: move blocking \
             calls (std::thread::sleep, std::sync::Mutex held across slow work, blocking I/O, long \
             computations) to tokio::task::spawn_blocking, or use tokio::time::sleep and \
             tokio::sync::Mutex"
        }
        (AlertKind::TaskSpinning, _) => {
            "a task is polled over and over without waiting or changing: it yields (yield_now) \
             or wakes itself (cx.waker().wake_by_ref()) while polling a condition that does not \
             come, burning its worker; await what it waits for instead (a Notify, a channel, a \
             watch), or back off with tokio::time::sleep or interval; give the loop an exit \
             (a CancellationToken)"
        }
        (AlertKind::GoroutineSpinning, _) => {
            "a loop never blocks or exits: give it an exit condition (check ctx.Done() or a quit \
             channel each iteration) and wait on a channel, sync.Cond or time.Ticker instead of \
             busy-waiting"
        }
        (_, "chan send") => {
            "goroutines block sending on a channel nobody receives from: give the channel a buffer \
             for results that may be abandoned (make(chan T, 1)), or select on ctx.Done() beside \
             the send so the sender can give up"
        }
        (_, "chan receive") => {
            "goroutines wait on a channel that is never closed or sent to: close it when the \
             producer is done (defer close(ch)) so range loops end, or select on ctx.Done() to \
             cancel the receiver"
        }
        (_, "select") => {
            "goroutines wait in a select whose channels never fire: add a case <-ctx.Done() \
             (context cancellation) or a timeout (time.After / context.WithTimeout)"
        }
        (_, "IO wait") => {
            "goroutines wait on network I/O with no deadline: set deadlines (SetReadDeadline, \
             http.Server timeouts) or use context-aware calls, and close idle connections"
        }
        (_, "sync.Mutex.Lock" | "sync.RWMutex.Lock" | "sync.RWMutex.RLock") => {
            "goroutines wait on a lock that is never released: pair every Lock with an Unlock \
             (defer mu.Unlock()), keep lock order consistent, and never hold a lock across a \
             blocking call"
        }
        (_, "sync.WaitGroup.Wait" | "semacquire") => {
            "goroutines wait on a WaitGroup or semaphore that never reaches zero: call wg.Done() \
             on every path (defer wg.Done()) and wg.Add before each go statement; add a timeout \
             or context around the wait"
        }
        (_, "sync.Cond.Wait") => {
            "goroutines wait on a sync.Cond that is never signalled: Signal/Broadcast after every \
             state change, or replace it with a channel and context cancellation"
        }
        (_, "chan send (nil chan)" | "chan receive (nil chan)") => {
            "goroutines block on a nil channel, which is never ready: make() the channel before \
             use (a nil channel in a select disables that case forever)"
        }
        (_, "select (no cases)") => {
            "an empty select{} blocks forever: wait on a context or a signal channel instead"
        }
        (AlertKind::GoroutineLeak, _) => {
            "goroutines are created faster than they finish: bound concurrency with a worker pool \
             or a semaphore (buffered channel), and give each one a way to exit (context \
             cancellation, timeouts)"
        }
        (_, _) => {
            "goroutines have waited past the threshold: give the wait a timeout or a \
             context.Context so it can be cancelled"
        }
    }
}
