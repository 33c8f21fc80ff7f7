//! SIGTERM and SIGINT: a flag any loop can check between steps, and a pipe the event loop
//! waits on, so a stop request is seen in every state, also in the middle of a scan. A second
//! signal, or a shutdown that overruns [`SHUTDOWN_LIMIT`], ends the process at once.

use std::{
    io,
    os::fd::{FromRawFd, OwnedFd},
    sync::atomic::{AtomicBool, AtomicI32, Ordering},
    time::Duration,
};

static STOP: AtomicBool = AtomicBool::new(false);
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);

/// How long shutdown (detaching, flushing the export queue) may take before the process ends
/// anyway; the shipped unit gives 20 s.
pub(crate) const SHUTDOWN_LIMIT: Duration = Duration::from_secs(10);

extern "C" fn on_signal(_: libc::c_int) {
    if STOP.swap(true, Ordering::SeqCst) {
        // The second request: the first one is taking too long.
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(130) };
    }
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: errno is this thread's; write is async-signal-safe, the pipe non-blocking
        // (a full one is fine). errno is restored: the interrupted code may be reading it.
        unsafe {
            let errno = libc::__errno_location();
            let saved = *errno;
            let _ = libc::write(fd, b"x".as_ptr().cast(), 1);
            *errno = saved;
        }
    }
}

/// Installs the handlers; returns the pipe's read end, readable once a stop is requested.
pub(crate) fn install() -> io::Result<OwnedFd> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both were just opened; the write end stays open for the process's life.
    let read = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    WAKE_FD.store(fds[1], Ordering::SeqCst);
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: a zeroed sigaction with a plain handler is valid.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        // SAFETY: installs a handler that only touches atomics and write(2).
        if unsafe { libc::sigaction(sig, &action, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(read)
}

/// Whether SIGTERM or SIGINT arrived.
pub(crate) fn stop_requested() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// Ends the process if shutdown has not finished within [`SHUTDOWN_LIMIT`].
pub(crate) fn arm_shutdown_limit() {
    let _ = std::thread::Builder::new()
        .name("leakmon-shutdown".into())
        .spawn(|| {
            std::thread::sleep(SHUTDOWN_LIMIT);
            log::error!("shutdown took over {SHUTDOWN_LIMIT:?}: exiting now");
            std::process::exit(1);
        });
}
