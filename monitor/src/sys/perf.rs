//! Perf events on one thread of a watched process: a CPU-clock sampler that runs one of
//! leakmon's eBPF programs, and a one-shot write watchpoint on one word.
//!
//! A counting watchpoint costs the target a debug trap on every write (about 20 µs each on
//! this VM's kernel, measured with a counter on a word written a million times): so the
//! watchpoint here disarms itself at its first hit (`PERF_EVENT_IOC_REFRESH` with 1), and
//! costs one trap at most.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

const PERF_TYPE_SOFTWARE: u32 = 1;
const PERF_TYPE_BREAKPOINT: u32 = 5;
const PERF_COUNT_SW_CPU_CLOCK: u64 = 0;
const HW_BREAKPOINT_W: u32 = 2;
const HW_BREAKPOINT_LEN_8: u64 = 8;
/// `perf_event_attr` flag bits.
const DISABLED: u64 = 1 << 0;
const EXCLUDE_KERNEL: u64 = 1 << 5;
const EXCLUDE_HV: u64 = 1 << 6;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
/// ioctls: `_IO('$', 0)`, `_IO('$', 2)`, `_IOW('$', 8, u32)`.
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
const PERF_EVENT_IOC_REFRESH: libc::c_ulong = 0x2402;
const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;

/// `struct perf_event_attr` up to `config2` (`PERF_ATTR_SIZE_VER1`, 72 bytes): all the
/// fields used here; the kernel takes a shorter struct as zeros beyond.
#[repr(C)]
#[derive(Default)]
struct Attr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    bp_addr: u64,
    bp_len: u64,
}

fn open(attr: &mut Attr, tid: u32) -> io::Result<OwnedFd> {
    attr.size = size_of::<Attr>() as u32;
    let pid =
        libc::pid_t::try_from(tid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `attr` is a valid perf_event_attr of the size it says; no group fd.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            std::ptr::from_mut(attr),
            pid,
            -1 as libc::c_int,
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

fn ioctl(fd: BorrowedFd<'_>, request: libc::c_ulong, arg: libc::c_int) -> io::Result<()> {
    // SAFETY: a perf event descriptor and one of its ioctls, whose argument is an int.
    if unsafe { libc::ioctl(fd.as_raw_fd(), request, arg) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A CPU-clock perf event on thread `tid` every `period_ns` of its CPU time, running the
/// eBPF program `program` at each sample; closed (and the program detached) on drop.
pub(crate) fn sample_with(
    tid: u32,
    period_ns: u64,
    program: BorrowedFd<'_>,
) -> io::Result<OwnedFd> {
    let mut attr = Attr {
        kind: PERF_TYPE_SOFTWARE,
        config: PERF_COUNT_SW_CPU_CLOCK,
        sample_period: period_ns,
        flags: DISABLED,
        ..Attr::default()
    };
    let fd = open(&mut attr, tid)?;
    ioctl(fd.as_fd(), PERF_EVENT_IOC_SET_BPF, program.as_raw_fd())?;
    ioctl(fd.as_fd(), PERF_EVENT_IOC_ENABLE, 0)?;
    Ok(fd)
}

/// A watchpoint on writes by thread `tid` to the 8 bytes at `addr` (8-aligned), armed for
/// one hit.
pub(crate) struct Watchpoint(OwnedFd);

impl Watchpoint {
    pub(crate) fn arm(tid: u32, addr: u64) -> io::Result<Self> {
        let mut attr = Attr {
            kind: PERF_TYPE_BREAKPOINT,
            sample_period: 1,
            flags: DISABLED | EXCLUDE_KERNEL | EXCLUDE_HV,
            bp_type: HW_BREAKPOINT_W,
            bp_addr: addr,
            bp_len: HW_BREAKPOINT_LEN_8,
            ..Attr::default()
        };
        let fd = open(&mut attr, tid)?;
        ioctl(fd.as_fd(), PERF_EVENT_IOC_REFRESH, 1)?;
        Ok(Self(fd))
    }

    /// Whether the thread wrote the word since the watchpoint was armed (`None`: unreadable).
    pub(crate) fn hit(&self) -> Option<bool> {
        let mut count = [0u8; 8];
        // SAFETY: reading a perf event's 8-byte count into an 8-byte buffer.
        let n = unsafe { libc::read(self.0.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
        (n == 8).then(|| u64::from_ne_bytes(count) > 0)
    }
}

/// Arms a watchpoint on a word of this thread, writes the word, and checks the hit: what
/// `leakmon doctor` says of hardware watchpoints here.
pub(crate) fn self_test() -> io::Result<()> {
    let word = Box::new(std::sync::atomic::AtomicU64::new(0));
    // SAFETY: gettid has no arguments.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as u32;
    let w = Watchpoint::arm(tid, std::ptr::from_ref(&*word) as u64)?;
    word.store(1, std::sync::atomic::Ordering::SeqCst);
    match w.hit() {
        Some(true) => Ok(()),
        _ => Err(io::Error::other("the watchpoint did not see a write")),
    }
}

impl std::fmt::Debug for Watchpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Watchpoint")
            .field(&self.0.as_raw_fd())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A watchpoint on this thread: no hit until the word is written, then one, and it stays
    /// disarmed (one trap at most).
    #[test]
    fn a_watchpoint_sees_the_first_write_and_disarms() {
        if !crate::sys::caps::missing(&[crate::sys::caps::CAP_PERFMON]).is_empty() {
            assert!(std::env::var_os("CI").is_none(), "CI runs as root");
            return;
        }
        self_test().expect("a watchpoint on this thread");
        let word = Box::new(std::sync::atomic::AtomicU64::new(0));
        // SAFETY: gettid has no arguments.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) } as u32;
        let addr = std::ptr::from_ref(&*word) as u64;
        let w = Watchpoint::arm(tid, addr).expect("perf_event_open of a breakpoint");
        assert_eq!(w.hit(), Some(false));
        let _ = word.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(w.hit(), Some(false), "a read is not a write");
        for i in 0..1000 {
            word.store(i, std::sync::atomic::Ordering::SeqCst);
        }
        assert_eq!(w.hit(), Some(true));
        let mut count = [0u8; 8];
        // SAFETY: as in `hit`.
        unsafe { libc::read(w.0.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
        assert_eq!(u64::from_ne_bytes(count), 1, "disarmed after its first hit");
    }
}
