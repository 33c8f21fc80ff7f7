//! What a futex wait is for: a lock (with an owner when the lock records one), an idle wait,
//! or a wait that ends by itself.

use monitor_ebpf::{FUTEX_LOCK_PI, FUTEX_WAIT, FUTEX_WAIT_REQUEUE_PI, FutexWait, WAIT_TIMED};

/// A futex(2) `op` without FUTEX_PRIVATE_FLAG and FUTEX_CLOCK_REALTIME.
const CMD_MASK: u32 = 127;
const FUTEX_WAIT_BITSET: u32 = 9;
const FUTEX_LOCK_PI2: u32 = 13;
/// PI futex words hold the owner's thread id in these bits.
const FUTEX_TID_MASK: u32 = 0x3fff_ffff;
/// glibc's x86_64 `pthread_mutex_t`: `int __lock; unsigned __count; int __owner; ...`.
pub(crate) const PTHREAD_MUTEX_OWNER_OFFSET: u64 = 8;
/// The "locked, with waiters" state of glibc's low-level locks and Rust std's futex mutex.
const CONTENDED: u32 = 2;

pub(crate) use crate::detect::{LockFlavor, WaitKind};

/// Functions that settle what a wait is for, innermost frame first; the first frame that
/// matches decides (a condition variable re-taking its mutex is a lock wait).
const LOCK_FUNCTIONS: [&str; 9] = [
    "__lll_lock_wait",
    "pthread_mutex_lock",
    "pthread_mutex_timedlock",
    "pthread_mutex_clocklock",
    "pthread_rwlock_rdlock",
    "pthread_rwlock_wrlock",
    "lock_contended",
    "read_contended",
    "write_contended",
];
const IDLE_FUNCTIONS: [&str; 11] = [
    "pthread_cond_wait",
    "pthread_cond_timedwait",
    "pthread_cond_clockwait",
    "pthread_join",
    "pthread_clockjoin",
    "pthread_timedjoin",
    "sem_wait",
    "sem_timedwait",
    "pthread_barrier_wait",
    "Condvar",
    "park",
];

/// Judges one wait: `frames` are the symbol names of its stack, innermost first (empty when
/// unknown); `word` is the futex word now; `in_go_runtime` says the wait was entered from a
/// Go binary's own code (the runtime parking an idle thread).
pub(crate) fn classify(
    wait: &FutexWait,
    word: Option<u32>,
    frames: &[&str],
    in_go_runtime: bool,
) -> (WaitKind, LockFlavor) {
    if wait.flags & WAIT_TIMED != 0 {
        return (WaitKind::Timed, LockFlavor::Other);
    }
    if wait.op == FUTEX_LOCK_PI {
        return (WaitKind::Lock, LockFlavor::PiMutex);
    }
    if in_go_runtime {
        return (WaitKind::Idle, LockFlavor::Other);
    }
    for frame in frames {
        if LOCK_FUNCTIONS.iter().any(|f| frame.contains(f)) {
            let flavor = if frame.contains("pthread_mutex") || frame.contains("__lll_lock_wait") {
                LockFlavor::PthreadMutex
            } else {
                LockFlavor::Other
            };
            return (WaitKind::Lock, flavor);
        }
        if IDLE_FUNCTIONS.iter().any(|f| frame.contains(f)) {
            return (WaitKind::Idle, LockFlavor::Other);
        }
    }
    // No telling frame (stripped code): a contended lock word that stays contended. Whose
    // lock it is cannot be told, so no owner is read.
    if wait.val == CONTENDED && word == Some(CONTENDED) {
        return (WaitKind::Lock, LockFlavor::Other);
    }
    (WaitKind::Idle, LockFlavor::Other)
}

/// The owner of a PI futex word, in the process's PID namespace (0: none).
pub(crate) fn pi_owner(word: u32) -> u32 {
    word & FUTEX_TID_MASK
}

/// Parses a futex wait from /proc/PID/task/TID/syscall ("202 0xuaddr 0xop 0xval 0xutime ...
/// sp pc"): for threads already waiting when leakmon started. None unless it is a futex
/// call in a blocking operation.
pub(crate) fn from_proc_syscall(line: &str, tgid: u32, since_ns: u64) -> Option<FutexWait> {
    const SYS_FUTEX: u64 = 202;
    let fields: Vec<u64> = line
        .split_whitespace()
        .map(|f| match f.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => f.parse().ok(),
        })
        .collect::<Option<_>>()?;
    if fields.len() < 9 || fields[0] != SYS_FUTEX {
        return None;
    }
    // As the probes record it.
    let op = match fields[2] as u32 & CMD_MASK {
        FUTEX_WAIT | FUTEX_WAIT_BITSET => FUTEX_WAIT,
        FUTEX_LOCK_PI | FUTEX_LOCK_PI2 => FUTEX_LOCK_PI,
        FUTEX_WAIT_REQUEUE_PI => FUTEX_WAIT_REQUEUE_PI,
        _ => return None,
    };
    Some(FutexWait {
        tgid,
        op,
        uaddr: fields[1],
        val: fields[3] as u32,
        flags: monitor_ebpf::WAIT_FROM_PROC | if fields[4] != 0 { WAIT_TIMED } else { 0 },
        since_ns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait(op: u32, val: u32) -> FutexWait {
        FutexWait {
            op,
            val,
            ..FutexWait::default()
        }
    }

    #[test]
    fn frames_decide_innermost_first() {
        let mutex = wait(FUTEX_WAIT, 2);
        assert_eq!(
            classify(
                &mutex,
                Some(2),
                &["__lll_lock_wait", "pthread_mutex_lock", "worker"],
                false
            ),
            (WaitKind::Lock, LockFlavor::PthreadMutex)
        );
        let cond = wait(FUTEX_WAIT, 0);
        assert_eq!(
            classify(
                &cond,
                Some(0),
                &[
                    "__futex_abstimed_wait_common",
                    "pthread_cond_wait@@GLIBC_2.3.2"
                ],
                false
            )
            .0,
            WaitKind::Idle
        );
        let rust = wait(FUTEX_WAIT, 2);
        assert_eq!(
            classify(
                &rust,
                Some(2),
                &["std::sys::sync::mutex::futex::Mutex::lock_contended"],
                false
            ),
            (WaitKind::Lock, LockFlavor::Other)
        );
    }

    #[test]
    fn without_frames_the_lock_word_decides() {
        // Whose lock cannot be told without frames: no owner is read.
        assert_eq!(
            classify(&wait(FUTEX_WAIT, 2), Some(2), &[], false),
            (WaitKind::Lock, LockFlavor::Other)
        );
        // Condition variables and thread parking wait on other values.
        assert_eq!(
            classify(&wait(FUTEX_WAIT, 0), Some(0), &[], false).0,
            WaitKind::Idle
        );
        assert_eq!(
            classify(&wait(FUTEX_WAIT, u32::MAX), Some(u32::MAX), &[], false).0,
            WaitKind::Idle
        );
        // A lock released since the wait began.
        assert_eq!(
            classify(&wait(FUTEX_WAIT, 2), Some(0), &[], false).0,
            WaitKind::Idle
        );
    }

    #[test]
    fn timeouts_pi_and_go_runtime() {
        let mut timed = wait(FUTEX_WAIT, 2);
        timed.flags = WAIT_TIMED;
        assert_eq!(
            classify(&timed, Some(2), &["pthread_mutex_lock"], false).0,
            WaitKind::Timed
        );
        assert_eq!(
            classify(&wait(FUTEX_LOCK_PI, 0), None, &[], false),
            (WaitKind::Lock, LockFlavor::PiMutex)
        );
        assert_eq!(
            classify(&wait(FUTEX_WAIT, 2), Some(2), &[], true).0,
            WaitKind::Idle
        );
        assert_eq!(pi_owner(0x8000_0000 | 4242), 4242);
    }

    #[test]
    fn proc_syscall_lines() {
        let w = from_proc_syscall(
            "202 0x55beaf82f240 0x80 0x2 0x0 0x0 0x0 0x7fce29fa2ea8 0x7fce2a02d12b",
            7,
            99,
        )
        .unwrap();
        assert_eq!(
            (w.uaddr, w.op, w.val, w.tgid, w.since_ns),
            (0x55be_af82_f240, FUTEX_WAIT, 2, 7, 99)
        );
        let pi = from_proc_syscall("202 0x10 0x86 0x0 0x0 0x0 0x0 0x7 0x8", 7, 0).unwrap();
        assert_eq!(pi.op, FUTEX_LOCK_PI);
        assert_eq!(w.flags, monitor_ebpf::WAIT_FROM_PROC);
        // A wake, another system call, a running thread.
        assert!(from_proc_syscall("202 0x1 0x81 0x1 0x0 0x0 0x0 0x7 0x8", 7, 0).is_none());
        assert!(from_proc_syscall("7 0x1 0x1 0x0 0x0 0x0 0x0 0x7 0x8", 7, 0).is_none());
        assert!(from_proc_syscall("running", 7, 0).is_none());
    }
}
