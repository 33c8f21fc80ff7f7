//! What /proc says about a process: its executable, its memory, its load address, its
//! container.

mod container;
pub(crate) mod debuginfo;
pub(crate) mod elf;
pub(crate) mod files;
pub(crate) mod maps;
mod mem;

use std::{io, path::PathBuf};

pub(crate) use container::{Container, container_of};
pub(crate) use mem::{ProcMem, u64_at};

#[derive(Debug, thiserror::Error)]
pub(crate) enum ProcError {
    #[error("no process with PID {pid}")]
    NoSuchProcess { pid: u32 },
    #[error("cannot read /proc/{pid}/{what} (run as root, or with CAP_SYS_PTRACE)")]
    Access {
        pid: u32,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("PID {pid} has no executable (a kernel thread?): nothing to watch")]
    NoExecutable { pid: u32 },
    #[error(
        "PID {pid} runs {exe}, on a FUSE file system: not read (a FUSE server that stops \
         answering leaves its readers stuck past SIGKILL); its threads are still watched"
    )]
    OnFuse { pid: u32, exe: String },
    #[error(
        "the kernel refuses access to /proc/{pid}/{what} although leakmon has CAP_SYS_PTRACE: \
         PID {pid} is protected (the host's init or a process in a sandbox whose security \
         policy forbids inspecting it); it cannot be watched"
    )]
    Protected {
        pid: u32,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("PID {pid}: the executable {exe} is not mapped in /proc/{pid}/maps")]
    NotMapped { pid: u32, exe: String },
    #[error(
        "cannot read /proc/{pid}/{what} of another user's process: grant CAP_DAC_READ_SEARCH \
         (reading only; see deploy/)"
    )]
    OtherUser {
        pid: u32,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

fn proc_err(pid: u32, what: &'static str, source: io::Error) -> ProcError {
    match source.kind() {
        // A kernel thread has a /proc entry but no executable.
        io::ErrorKind::NotFound if what == "exe" && is_alive(pid) => {
            ProcError::NoExecutable { pid }
        }
        io::ErrorKind::NotFound => ProcError::NoSuchProcess { pid },
        // /proc/PID/mem is its owner's, mode 0600: another user's needs DAC_READ_SEARCH.
        io::ErrorKind::PermissionDenied
            if !crate::sys::caps::missing(&[crate::sys::caps::CAP_DAC_READ_SEARCH]).is_empty()
                && owner(pid) != Some(current_uid()) =>
        {
            ProcError::OtherUser { pid, what, source }
        }
        io::ErrorKind::PermissionDenied
            if crate::sys::caps::missing(&[crate::sys::caps::CAP_SYS_PTRACE]).is_empty() =>
        {
            ProcError::Protected { pid, what, source }
        }
        _ => ProcError::Access { pid, what, source },
    }
}

/// The owner (uid) of `pid`'s /proc entry.
fn owner(pid: u32) -> Option<u32> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(format!("/proc/{pid}"))
        .ok()
        .map(|m| m.uid())
}

fn current_uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

/// Refuses an executable on a FUSE file system: looked up among `pid`'s mappings of FUSE files
/// (from [`maps::fuse_mappings`]) by the path /proc/PID/exe names, without asking the file's
/// file system.
pub(crate) fn check_exe_not_on_fuse(pid: u32, fuse: &[maps::Mapping]) -> Result<(), ProcError> {
    if fuse.is_empty() {
        return Ok(());
    }
    let exe = exe_path(pid)?;
    let exe = exe.to_string_lossy();
    // The whole path (it may hold spaces, or end in " (deleted)" like the link's text).
    if fuse.iter().any(|m| *m.path == *exe) {
        return Err(ProcError::OnFuse {
            pid,
            exe: exe.into_owned(),
        });
    }
    Ok(())
}

/// What failing to reach `pid`'s executable means.
pub(crate) fn exe_error(pid: u32, source: io::Error) -> ProcError {
    proc_err(pid, "exe", source)
}

/// Whether `pid` is alive (not a zombie).
/// Threads of `pid` on a CPU (or waiting for one) now, at most `max` (of the first 4,096):
/// their /proc `syscall` says "running".
pub(crate) fn threads_on_cpu(pid: u32, max: usize) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .take(4096)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|tid| {
            files::read_proc_capped(&format!("/proc/{pid}/task/{tid}/syscall"), 256)
                .is_ok_and(|l| l.starts_with(b"running"))
        })
        .take(max)
        .collect()
}

pub(crate) fn is_alive(pid: u32) -> bool {
    stat(pid).is_ok_and(|(state, _)| state != 'Z')
}

/// (state, start time) from /proc/PID/stat; the start time (clock ticks since boot, field 22)
/// with the PID names a process uniquely across PID reuse.
pub(crate) fn stat(pid: u32) -> Result<(char, u64), ProcError> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| proc_err(pid, "stat", e))?;
    // The name in parentheses may hold spaces: fields are counted after the last ')'.
    let mut fields = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .unwrap_or_default()
        .split_whitespace();
    let state = fields.next().and_then(|f| f.chars().next()).unwrap_or('?');
    let start = fields.nth(18).and_then(|f| f.parse().ok()).unwrap_or(0);
    Ok((state, start))
}

/// How long ago a process started, from its start time in clock ticks since boot (as
/// [`stat`] gives it); `None` when the clocks cannot be read.
pub(crate) fn age(start_ticks: u64) -> Option<std::time::Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; CLOCK_BOOTTIME (what /proc's start times count
    // from) exists on every supported kernel.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return None;
    }
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok()?;
    let now = std::time::Duration::new(u64::try_from(ts.tv_sec).ok()?, 0);
    let started = std::time::Duration::from_millis(start_ticks.checked_mul(1000)? / hz.max(1));
    now.checked_sub(started)
}

/// The path of the process's executable, as the host sees it (`/proc/PID/exe` resolves it even
/// inside another mount namespace, so that is what probes attach through).
pub(crate) fn exe_path(pid: u32) -> Result<PathBuf, ProcError> {
    std::fs::read_link(format!("/proc/{pid}/exe")).map_err(|e| proc_err(pid, "exe", e))
}

/// How far the executable was moved when loaded (0 for Go's default non-PIE executables):
/// the start of its first mapping minus the lowest address its segments ask for.
pub(crate) fn load_bias(pid: u32, lowest_vaddr: u64) -> Result<u64, ProcError> {
    use std::os::unix::fs::MetadataExt as _;
    // Matched by inode, not path: the path reads "... (deleted)" once a package upgrade
    // replaced the file, and may hold spaces.
    let inode = std::fs::metadata(format!("/proc/{pid}/exe"))
        .map_err(|e| proc_err(pid, "exe", e))?
        .ino();
    load_bias_of(pid, inode, lowest_vaddr)
}

/// Where the file of inode `inode` (the executable or a library) is loaded in `pid`, given
/// its lowest PT_LOAD address.
pub(crate) fn load_bias_of(pid: u32, inode: u64, lowest_vaddr: u64) -> Result<u64, ProcError> {
    let maps = maps::read(pid).map_err(|e| proc_err(pid, "maps", e))?;
    if let Some(m) = maps.iter().find(|m| m.file.1 == inode && m.offset == 0) {
        return Ok(m.start.wrapping_sub(lowest_vaddr & !0xfff));
    }
    Err(ProcError::NotMapped {
        pid,
        exe: exe_path(pid)?.display().to_string(),
    })
}

/// A shared library a process maps: its path as /proc/PID/maps names it, and its inode.
#[derive(Clone, Debug)]
pub(crate) struct Library {
    pub path: PathBuf,
    pub ino: u64,
}

/// Identity of an executable file (device, inode, mtime), not its path: a redeploy replaces
/// the file under the same path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct BinaryKey {
    dev: u64,
    ino: u64,
    mtime: i64,
}

impl BinaryKey {
    /// The executable `pid` runs now.
    pub(crate) fn of(pid: u32) -> Result<Self, ProcError> {
        use std::os::unix::fs::MetadataExt as _;
        let m = std::fs::metadata(format!("/proc/{pid}/exe"))
            .map_err(|source| exe_error(pid, source))?;
        Ok(Self {
            dev: m.dev(),
            ino: m.ino(),
            mtime: m.mtime(),
        })
    }

    pub(crate) fn ino(&self) -> u64 {
        self.ino
    }
}

/// Whether `pid` still runs the executable `key` names (an exec keeps the PID), not from FUSE;
/// brings up to date which of its memory `mem` must not read (mapped from FUSE files).
/// Checked for FUSE first: the identity is a stat() of the file, and an exec may have brought
/// in one on a FUSE mount.
pub(crate) fn runs_same_program(pid: u32, key: BinaryKey, mem: &mut ProcMem) -> bool {
    let fuse = maps::fuse_mappings(pid);
    mem.set_fuse_mappings(&fuse);
    check_exe_not_on_fuse(pid, &fuse).is_ok() && BinaryKey::of(pid).ok() == Some(key)
}

/// Monotonic clock in nanoseconds: the clock `bpf_ktime_get_ns` and Go's `nanotime` use.
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}
