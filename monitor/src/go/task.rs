//! Reading goroutines (`runtime.g`) and their stacks out of a running process's memory. Reads
//! are racy by nature (the process runs on); callers validate what they read (goid, status).

use super::GOffsets;
use crate::proc::ProcMem;

/// `runtime._Grunnable`: descheduled, waiting for a CPU.
pub(super) const G_RUNNABLE: u32 = 1;
/// `runtime._Grunning`: on a CPU (its saved `sched.sp` is stale).
pub(super) const G_RUNNING: u32 = 2;
/// `runtime._Gsyscall`: in a system call.
pub(super) const G_SYSCALL: u32 = 3;
/// `runtime._Gcopystack`: its stack is being moved (not running user code).
const G_COPYSTACK: u32 = 8;
/// `runtime._Gwaiting`: parked.
pub(super) const G_WAITING: u32 = 4;
/// `runtime._Gpreempted`: stopped by a preemption, descheduled.
pub(super) const G_PREEMPTED: u32 = 9;
/// `runtime._Gleaked` (go1.27): parked, and found leaked by the runtime's own profile.
pub(super) const G_LEAKED: u32 = 10;
/// `runtime._Gdead`: exited (the `g` waits for reuse).
pub(super) const G_DEAD: u32 = 6;
/// How a goroutine's status is counted (`go.goroutine.count`'s `leakmon.task_state`); None
/// for a `g` that runs no goroutine (idle, dead, exiting).
pub(super) fn state_name(status: u32) -> Option<&'static str> {
    match status {
        G_RUNNABLE | G_PREEMPTED | G_COPYSTACK => Some("runnable"),
        G_RUNNING => Some("running"),
        G_SYSCALL => Some("syscall"),
        G_WAITING | G_LEAKED => Some("waiting"),
        _ => None,
    }
}

/// `runtime._Gscan`: set on top of the status while the GC scans the stack.
const G_SCAN: u32 = 0x1000;
/// `g.stack.hi`: `stack` is the first field of `runtime.g` in every version ("offset known to
/// runtime/cgo"), and `hi` its second word.
const STACK_HI_OFFSET: u64 = 8;
/// Deep enough to get past the runtime and library frames to the program's own.
const MAX_FRAMES: usize = 48;

/// The fields of one `runtime.g` that leakmon uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct GRecord {
    pub goid: u64,
    pub status: u32,
    pub waitreason: u8,
    /// PC of the `go` statement that created it (a return address).
    pub gopc: u64,
    /// PC of its entry function.
    pub startpc: u64,
    pub sched_pc: u64,
    pub sched_sp: u64,
    pub sched_bp: u64,
    pub tracking_seq: u8,
    /// Bytes of stack in use when it was descheduled (`stack.hi - sched.sp`): unlike
    /// `sched.sp`, unchanged when the GC moves (shrinks) a parked goroutine's stack.
    pub stack_depth: u64,
    /// `g.stack.lo` and `g.stack.hi`.
    pub stack_lo: u64,
    pub stack_hi: u64,
    /// `g.waiting` (a `*sudog`).
    pub waiting: u64,
    /// The goroutine that created it.
    pub parent_goid: u64,
    /// `g.waitsince` (nanotime; 0 until a GC has scanned it parked).
    pub waitsince: i64,
    /// It has defer or panic records (`g._defer`, `g._panic`).
    pub defers: bool,
}

/// Bytes of a `g` that [`parse_g`] needs: from its start (`stack`) to the last field used.
fn g_span(off: &GOffsets) -> usize {
    let fields = [
        off.goid,
        off.atomicstatus,
        off.waitreason,
        off.gopc,
        off.startpc,
        off.sched_pc,
        off.sched_sp,
        off.sched_bp,
        off.tracking_seq,
        off.waiting,
        off.parent_goid,
        off.waitsince,
        off.panic,
        off.defer,
    ];
    fields.iter().max().map_or(0, |m| *m as usize + 8)
}

/// Reads the `g` at `addr`.
pub(super) fn read_g(mem: &ProcMem, addr: u64, off: &GOffsets) -> Option<GRecord> {
    let mut buf = vec![0u8; g_span(off)];
    mem.read(addr, &mut buf).then(|| parse_g(&buf, off))
}

/// Reads the `g`s at `addrs`, many per system call (a scan reads every goroutine).
pub(super) fn read_gs(mem: &ProcMem, addrs: &[u64], off: &GOffsets) -> Vec<Option<GRecord>> {
    let span = g_span(off);
    let (buf, ok) = mem.read_many(addrs, span);
    ok.iter()
        .enumerate()
        .map(|(i, ok)| ok.then(|| parse_g(&buf[i * span..(i + 1) * span], off)))
        .collect()
}

fn parse_g(buf: &[u8], off: &GOffsets) -> GRecord {
    let at = |o: u32, n: usize| -> u64 {
        let s = o as usize;
        let mut b = [0u8; 8];
        if let Some(src) = buf.get(s..s + n) {
            b[..n].copy_from_slice(src);
        }
        u64::from_le_bytes(b)
    };
    GRecord {
        goid: at(off.goid, 8),
        status: at(off.atomicstatus, 4) as u32 & !G_SCAN,
        waitreason: at(off.waitreason, 1) as u8,
        gopc: at(off.gopc, 8),
        startpc: at(off.startpc, 8),
        sched_pc: at(off.sched_pc, 8),
        sched_sp: at(off.sched_sp, 8),
        sched_bp: at(off.sched_bp, 8),
        tracking_seq: at(off.tracking_seq, 1) as u8,
        stack_depth: at(STACK_HI_OFFSET as u32, 8).wrapping_sub(at(off.sched_sp, 8)),
        stack_lo: at(0, 8),
        stack_hi: at(STACK_HI_OFFSET as u32, 8),
        waiting: at(off.waiting, 8),
        parent_goid: at(off.parent_goid, 8),
        waitsince: at(off.waitsince, 8) as i64,
        defers: at(off.panic, 8) != 0 || at(off.defer, 8) != 0,
    }
}

/// PCs of a parked goroutine's stack, innermost first: `sched.pc` then the return addresses
/// found by following the frame-pointer chain from `sched.bp` (Go keeps frame pointers on
/// amd64). All are return addresses: symbolise `pc - 1`.
pub(super) fn stack(mem: &ProcMem, g: &GRecord) -> Vec<u64> {
    let mut pcs = vec![g.sched_pc];
    let mut bp = g.sched_bp;
    // Frames lie on the goroutine's own stack, between its saved sp and stack.hi: a frame
    // pointer outside it is a torn read or a hostile value, not a frame.
    let hi = g.sched_sp.saturating_add(g.stack_depth);
    while pcs.len() < MAX_FRAMES && bp >= g.sched_sp && bp.saturating_add(16) <= hi {
        let mut frame = [0u8; 16];
        if !mem.read(bp, &mut frame) {
            break;
        }
        let (next_bp, ret) = frame.split_at(8);
        let next_bp = u64::from_le_bytes(next_bp.try_into().unwrap_or_default());
        let ret = u64::from_le_bytes(ret.try_into().unwrap_or_default());
        if ret == 0 {
            break;
        }
        pcs.push(ret);
        // The stack grows down: callers' frames are above. Anything else is a torn read.
        if next_bp <= bp {
            break;
        }
        bp = next_bp;
    }
    pcs
}

/// The `g` pointers of every goroutine, from the `runtime.allgs` slice at `allgs_addr`.
pub(super) fn all_gs(mem: &ProcMem, allgs_addr: u64, limit: usize) -> Vec<u64> {
    let mut gs = Vec::new();
    // A length past the mapping ends at the first unreadable chunk: what was read is kept.
    let _ = pointer_slice(mem, allgs_addr, limit, |chunk| gs.extend_from_slice(chunk));
    gs
}

/// Why a slice of pointers was not read whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SliceError {
    Unreadable,
    /// Its header says more than `limit` elements (read up to `limit`).
    TooLong,
}

/// Reads the Go slice of pointers whose header (`ptr`, `len`) is at `header`, at most
/// `limit` elements, in chunks (the buffer stays small whatever the header says), handing
/// each chunk's non-nil pointers to `each`.
pub(crate) fn pointer_slice(
    mem: &ProcMem,
    header: u64,
    limit: usize,
    mut each: impl FnMut(&[u64]),
) -> Result<(), SliceError> {
    const CHUNK: usize = 4096;
    let (Some(ptr), Some(len)) = (mem.read_u64(header), mem.read_u64(header.wrapping_add(8)))
    else {
        return Err(SliceError::Unreadable);
    };
    let declared = usize::try_from(len).unwrap_or(usize::MAX);
    let len = declared.min(limit);
    let mut raw = vec![0u8; CHUNK.min(len) * 8];
    let mut pointers = Vec::with_capacity(CHUNK.min(len));
    let mut i = 0;
    while i < len {
        let n = (len - i).min(CHUNK);
        let buf = &mut raw[..n * 8];
        if !mem.read(ptr.wrapping_add(i as u64 * 8), buf) {
            return Err(SliceError::Unreadable);
        }
        pointers.clear();
        pointers.extend(
            buf.as_chunks::<8>()
                .0
                .iter()
                .map(|c| u64::from_le_bytes(*c))
                .filter(|p| *p != 0),
        );
        each(&pointers);
        i += n;
    }
    if declared > limit {
        return Err(SliceError::TooLong);
    }
    Ok(())
}

/// The import path of the package a Go function name belongs to (`net/http` for
/// `net/http.(*conn).serve`).
fn package_of(function: &str) -> &str {
    let after_slash = function.rfind('/').map_or(0, |i| i + 1);
    let end = function[after_slash..]
        .find('.')
        .map_or(function.len(), |i| after_slash + i);
    &function[..end]
}

/// Whether a function is the program's own: in package main or in the main module
/// (`main_module`, from the build info). Without module info, a package whose path has a dot
/// in its first element (a module, not the standard library) counts.
fn is_user_function(function: &str, main_module: Option<&str>) -> bool {
    let package = package_of(function);
    if package == "main" {
        return true;
    }
    match main_module {
        Some(m) => {
            package == m
                || package
                    .strip_prefix(m)
                    .is_some_and(|rest| rest.starts_with('/'))
        }
        None => is_third_party(package),
    }
}

/// Standard-library import paths have no dot in their first element (`sync`, `net/http`).
fn is_third_party(package: &str) -> bool {
    package
        .split('/')
        .next()
        .is_some_and(|first| first.contains('.'))
}

/// Where a goroutine is, for an alert: the first frame of `frames` (innermost first) in the
/// program's own code; else the first in a dependency; else the first outside the runtime
/// and the standard library's runtime hooks.
pub(super) fn pick_frame<'f, F>(
    frames: &'f [F],
    function: impl Fn(&F) -> &str,
    main_module: Option<&str>,
) -> Option<&'f F> {
    frames
        .iter()
        .find(|f| is_user_function(function(f), main_module))
        .or_else(|| {
            frames
                .iter()
                .find(|f| is_third_party(package_of(function(f))))
        })
        .or_else(|| {
            frames.iter().find(|f| {
                let name = function(f);
                !name.starts_with("runtime.")
                    && !name.starts_with("internal/")
                    && !name.contains(".runtime_")
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_functions() {
        assert!(is_user_function("main.leakSend.func1", None));
        assert!(is_user_function(
            "github.com/acme/api.(*Server).handle",
            None
        ));
        assert!(is_user_function("leakmon.dev/fixtures/x.Worker", None));
        assert!(!is_user_function("sync.(*Mutex).Lock", None));
        assert!(!is_user_function("net/http.(*conn).serve", None));
        assert!(!is_user_function("runtime.gopark", None));
        assert!(!is_user_function("internal/poll.(*FD).Read", None));
        // With the main module known: a dot-less module is the program's, a dependency not.
        let m = Some("orders");
        assert!(is_user_function("orders/internal/store.(*DB).Get", m));
        assert!(is_user_function("orders.Run", m));
        assert!(!is_user_function("ordersx/y.F", m));
        assert!(!is_user_function("github.com/acme/lib.Pool.Get", m));
        assert!(!is_user_function("sync.(*WaitGroup).Wait", m));
    }

    #[test]
    fn picks_own_then_dependency_then_library_frames() {
        let m = Some("orders");
        let stack: Vec<String> = [
            "runtime.gopark",
            "sync.runtime_SemacquireWaitGroup",
            "sync.(*WaitGroup).Wait",
            "github.com/acme/lib.(*Group).Wait",
            "orders/internal/jobs.run",
        ]
        .map(String::from)
        .to_vec();
        let pick = |n: usize| pick_frame(&stack[..n], |s: &String| s.as_str(), m).cloned();
        assert_eq!(pick(5).as_deref(), Some("orders/internal/jobs.run"));
        assert_eq!(
            pick(4).as_deref(),
            Some("github.com/acme/lib.(*Group).Wait")
        );
        assert_eq!(pick(3).as_deref(), Some("sync.(*WaitGroup).Wait"));
    }
}
