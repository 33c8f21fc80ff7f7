//! leakmon's kernel programs.
//!
//! Go probes keep one [`GoState`] per goroutine of each watched process in `GOROUTINES`,
//! updated in place; userspace scans that map instead of receiving an event per park, so the
//! per-hit cost is a map lookup and a few stores. Running is seen through preemption
//! (`goschedImpl`), which only goroutines that keep the CPU reach. Parks are seen by
//! userspace scanning the process's goroutine table when the binary has a symbol table; only
//! for stripped binaries are `gopark` (every park: the hot path) and `goexit1` probed. They are uprobes on plain entry points (never
//! uretprobes: Go copies stacks and would meet the trampoline's return address), placed by
//! userspace after the stack-bound check of the prologue where x86 emulates the instruction.
//!
//! Thread probes watch every process on the host: futex waits in flight (`THREAD_WAITS`, one
//! entry per waiting thread, removed when the wait returns) and when each thread last left a
//! CPU (`THREADS`). Both are updated in place; no event leaves the kernel per wait or switch,
//! and stacks are taken by userspace, only for the few waits that last.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod probes {
    use aya_ebpf::{
        helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user},
        macros::{btf_tracepoint, map, tracepoint, uprobe},
        maps::{HashMap, PerCpuArray, RingBuf},
        programs::{BtfTracePointContext, ProbeContext, TracePointContext},
    };
    use monitor_ebpf::{
        FUTEX_OP_WAIT2, FUTEX_OP_WAITV, FutexWait, GoKey, GoPhase, GoProc, GoState, MAX_GO_PROCS,
        MAX_GOROUTINES, MAX_THREAD_WAITS, MAX_THREADS, PROC_EVENT_EXEC, PROC_EVENTS_BYTES,
        ProcEvent, ThreadState, WAIT_TIMED, stat,
    };

    /// BPF_F_NO_PREALLOC: memory follows the live goroutine count, not the capacity.
    const NO_PREALLOC: u32 = 1;

    #[map]
    static GO_PROCS: HashMap<u32, GoProc> = HashMap::with_max_entries(MAX_GO_PROCS, 0);

    #[map]
    static GOROUTINES: HashMap<GoKey, GoState> =
        HashMap::with_max_entries(MAX_GOROUTINES, NO_PREALLOC);

    #[map]
    static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

    #[map]
    static PROC_EVENTS: RingBuf = RingBuf::with_byte_size(PROC_EVENTS_BYTES, 0);

    #[map]
    static THREAD_WAITS: HashMap<u32, FutexWait> = HashMap::with_max_entries(MAX_THREAD_WAITS, 0);

    /// Not preallocated: sized for a busy host, paid for by the threads that exist. Entries
    /// are updated in place, so only a thread's first switch allocates.
    #[map]
    static THREADS: HashMap<u32, ThreadState> = HashMap::with_max_entries(MAX_THREADS, NO_PREALLOC);

    #[inline(always)]
    fn count(index: u32) {
        if let Some(counter) = STATS.get_ptr_mut(index) {
            // SAFETY: per-CPU slot, no concurrent writer.
            unsafe { *counter += 1 };
        }
    }

    /// The watched process's parameters and the goroutine key for `g`, or `None` when the
    /// calling process is not watched (the probe is attached per PID, but a fork shares the
    /// mapping) or the `g` cannot be read.
    #[inline(always)]
    fn key_of(g: u64) -> Option<(GoProc, GoKey)> {
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        // SAFETY: the map value is plain data.
        let proc = unsafe { GO_PROCS.get(&tgid) }?;
        let goid_ptr = (g + u64::from(proc.goid_offset)) as *const u64;
        // SAFETY: bpf_probe_read_user validates the user address.
        match unsafe { bpf_probe_read_user(goid_ptr) } {
            Ok(goid) => Some((
                *proc,
                GoKey {
                    tgid,
                    _pad: 0,
                    goid,
                },
            )),
            Err(_) => {
                count(stat::READ_ERRORS);
                None
            }
        }
    }

    #[inline(always)]
    fn store(key: &GoKey, state: &GoState) {
        if GOROUTINES.insert(key, state, 0).is_err() {
            count(stat::MAP_FULL);
        }
    }

    /// `func gopark(unlockf func(*g, unsafe.Pointer) bool, lock unsafe.Pointer,
    ///              reason waitReason, traceReason traceBlockReason, traceskip int)`
    /// ABIInternal: RAX=unlockf, RBX=lock, CL=reason; R14 = the parking goroutine's g.
    #[uprobe]
    pub fn go_park(ctx: ProbeContext) -> u32 {
        // SAFETY: uprobe context is a pt_regs.
        let regs = unsafe { &*ctx.regs };
        count(stat::PARKS);
        let Some((_, key)) = key_of(regs.r14) else {
            return 0;
        };
        let now = unsafe { bpf_ktime_get_ns() };
        let state = GoState {
            g: regs.r14,
            since_ns: now,
            last_run_ns: now,
            wait_obj: regs.rbx,
            runs: 0,
            phase: GoPhase::Parked as u8,
            reason: regs.rcx as u8,
            seq: 0,
            _pad: 0,
        };
        store(&key, &state);
        0
    }

    /// `func goschedImpl(gp *g, preempted bool)` (go1.21: `goschedImpl(gp *g)`): RAX=gp,
    /// put back on the run queue without parking: preempted after running 10ms (sysmon,
    /// synchronous or asynchronous) or `runtime.Gosched`. Runs on g0, so the target is the
    /// argument, not R14. Only goroutines that keep the CPU get here: unlike `execute`, cold.
    #[uprobe]
    pub fn go_preempt(ctx: ProbeContext) -> u32 {
        // SAFETY: uprobe context is a pt_regs.
        let regs = unsafe { &*ctx.regs };
        count(stat::PREEMPTS);
        let gp = regs.rax;
        let Some((proc, key)) = key_of(gp) else {
            return 0;
        };
        let seq_ptr = (gp + u64::from(proc.tracking_seq_offset)) as *const u8;
        // SAFETY: bpf_probe_read_user validates the user address.
        let Ok(seq) = (unsafe { bpf_probe_read_user(seq_ptr) }) else {
            count(stat::READ_ERRORS);
            return 0;
        };
        let now = unsafe { bpf_ktime_get_ns() };
        match GOROUTINES.get_ptr_mut(&key) {
            Some(state) => {
                // SAFETY: the goroutine runs on one thread at a time, so its entry has one writer.
                let state = unsafe { &mut *state };
                // Parked, or any other transition out of running since the last preemption:
                // a new run starts here.
                if state.phase == GoPhase::Parked as u8 || seq != state.seq.wrapping_add(1) {
                    state.phase = GoPhase::Running as u8;
                    state.since_ns = now;
                    state.runs = 0;
                }
                state.runs = state.runs.saturating_add(1);
                state.last_run_ns = now;
                state.seq = seq;
                state.g = gp;
            }
            None => store(
                &key,
                &GoState {
                    g: gp,
                    since_ns: now,
                    last_run_ns: now,
                    wait_obj: 0,
                    runs: 1,
                    phase: GoPhase::Running as u8,
                    reason: 0,
                    seq,
                    _pad: 0,
                },
            ),
        }
        0
    }

    /// `func goexit1()`: the goroutine in R14 is finishing.
    #[uprobe]
    pub fn go_exit(ctx: ProbeContext) -> u32 {
        // SAFETY: uprobe context is a pt_regs.
        let regs = unsafe { &*ctx.regs };
        count(stat::EXITS);
        if let Some((_, key)) = key_of(regs.r14) {
            // Absent when it started before we attached and never parked since.
            let _ = GOROUTINES.remove(&key);
        }
        0
    }

    #[inline(always)]
    fn send_proc_event(kind: u32) {
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        if PROC_EVENTS.output(&ProcEvent { tgid, kind }, 0).is_err() {
            count(stat::PROC_EVENTS_LOST);
        }
    }

    /// `TP_PROTO(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)`: a new
    /// program; userspace checks whether it is Go. (Exits need no event: each scan checks that
    /// watched processes live.)
    #[btf_tracepoint(function = "sched_process_exec")]
    pub fn proc_exec(_ctx: BtfTracePointContext) -> i32 {
        send_proc_event(PROC_EVENT_EXEC);
        0
    }

    /// The calling thread: (tgid, tid).
    #[inline(always)]
    fn current() -> (u32, u32) {
        let id = bpf_get_current_pid_tgid();
        ((id >> 32) as u32, id as u32)
    }

    #[inline(always)]
    fn record_wait(op: u32, uaddr: u64, val: u32, timed: bool) {
        count(stat::FUTEX_WAITS);
        let (tgid, tid) = current();
        let wait = FutexWait {
            tgid,
            op,
            uaddr,
            val,
            flags: if timed { WAIT_TIMED } else { 0 },
            since_ns: unsafe { bpf_ktime_get_ns() },
        };
        if THREAD_WAITS.insert(&tid, &wait, 0).is_err() {
            count(stat::THREAD_WAITS_FULL);
        }
    }

    #[inline(always)]
    fn end_wait() {
        let (_, tid) = current();
        let _ = THREAD_WAITS.remove(&tid);
    }

    /// `futex(u32 *uaddr, int op, u32 val, const struct __kernel_timespec *utime, ...)`
    /// (syscalls/sys_enter_futex: uaddr at 16, op at 24, val at 32, utime at 40). Only the
    /// operations that block: FUTEX_WAIT, FUTEX_LOCK_PI, FUTEX_WAIT_BITSET,
    /// FUTEX_WAIT_REQUEUE_PI, FUTEX_LOCK_PI2.
    #[tracepoint(category = "syscalls", name = "sys_enter_futex")]
    pub fn futex_enter(ctx: TracePointContext) -> u32 {
        // SAFETY: offsets from the tracepoint's format; each read is bounds-checked.
        let Ok(op) = (unsafe { ctx.read_at::<u64>(24) }) else {
            return 0;
        };
        let op = op as u32;
        // Without FUTEX_PRIVATE_FLAG (128) and FUTEX_CLOCK_REALTIME (256).
        if !matches!(op & 127, 0 | 6 | 9 | 11 | 13) {
            return 0;
        }
        let (Ok(uaddr), Ok(val), Ok(utime)) = (unsafe {
            (
                ctx.read_at::<u64>(16),
                ctx.read_at::<u64>(32),
                ctx.read_at::<u64>(40),
            )
        }) else {
            return 0;
        };
        record_wait(op, uaddr, val as u32, utime != 0);
        0
    }

    /// Every futex call returns through here; removing an absent key is a cheap miss.
    #[tracepoint(category = "syscalls", name = "sys_exit_futex")]
    pub fn futex_exit(_ctx: TracePointContext) -> u32 {
        end_wait();
        0
    }

    /// `futex_waitv(struct futex_waitv *waiters, unsigned int nr_futexes, unsigned int flags,
    /// struct __kernel_timespec *timeout, clockid_t clockid)`: waiters at 16, timeout at 40.
    /// Records the first futex (`struct futex_waitv { u64 val; u64 uaddr; ... }`).
    #[tracepoint(category = "syscalls", name = "sys_enter_futex_waitv")]
    pub fn futex_waitv_enter(ctx: TracePointContext) -> u32 {
        let (Ok(waiters), Ok(timeout)) =
            (unsafe { (ctx.read_at::<u64>(16), ctx.read_at::<u64>(40)) })
        else {
            return 0;
        };
        // SAFETY: bpf_probe_read_user validates the user address.
        let (val, uaddr) = unsafe {
            (
                bpf_probe_read_user(waiters as *const u64).unwrap_or(0),
                bpf_probe_read_user((waiters + 8) as *const u64).unwrap_or(0),
            )
        };
        record_wait(FUTEX_OP_WAITV, uaddr, val as u32, timeout != 0);
        0
    }

    #[tracepoint(category = "syscalls", name = "sys_exit_futex_waitv")]
    pub fn futex_waitv_exit(_ctx: TracePointContext) -> u32 {
        end_wait();
        0
    }

    /// futex2 `futex_wait(void *uaddr, unsigned long val, unsigned long mask, unsigned int
    /// flags, struct __kernel_timespec *timeout, clockid_t clockid)` (Linux 6.7+): uaddr at
    /// 16, val at 24, timeout at 48.
    #[tracepoint(category = "syscalls", name = "sys_enter_futex_wait")]
    pub fn futex_wait_enter(ctx: TracePointContext) -> u32 {
        let (Ok(uaddr), Ok(val), Ok(timeout)) = (unsafe {
            (
                ctx.read_at::<u64>(16),
                ctx.read_at::<u64>(24),
                ctx.read_at::<u64>(48),
            )
        }) else {
            return 0;
        };
        record_wait(FUTEX_OP_WAIT2, uaddr, val as u32, timeout != 0);
        0
    }

    #[tracepoint(category = "syscalls", name = "sys_exit_futex_wait")]
    pub fn futex_wait_exit(_ctx: TracePointContext) -> u32 {
        end_wait();
        0
    }

    /// `TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next,
    /// unsigned int prev_state)` (Linux 5.18+). Runs on every context switch, in `prev`'s
    /// context: records when it left the CPU. A dying thread's last switch drops it.
    #[btf_tracepoint(function = "sched_switch")]
    pub fn sched_switch(ctx: BtfTracePointContext) -> i32 {
        count(stat::SWITCHES);
        let (tgid, tid) = current();
        if tid == 0 {
            return 0;
        }
        let prev_state: u32 = ctx.arg(3);
        // TASK_DEAD
        if prev_state & 0x80 != 0 {
            let _ = THREADS.remove(&tid);
            let _ = THREAD_WAITS.remove(&tid);
            return 0;
        }
        let now = unsafe { bpf_ktime_get_ns() };
        match THREADS.get_ptr_mut(&tid) {
            Some(state) => {
                // SAFETY: only this thread's own switches write its entry.
                let state = unsafe { &mut *state };
                state.tgid = tgid;
                state.off_cpu_since_ns = now;
            }
            None => {
                let state = ThreadState {
                    tgid,
                    _pad: 0,
                    created_ns: 0,
                    off_cpu_since_ns: now,
                };
                if THREADS.insert(&tid, &state, 0).is_err() {
                    count(stat::THREADS_FULL);
                }
            }
        }
        0
    }

    /// sched/sched_process_fork: `child_pid` at 20. Fires for new threads and new processes
    /// alike, in the parent: a new process is corrected to its own tgid at its first switch.
    #[tracepoint(category = "sched", name = "sched_process_fork")]
    pub fn thread_fork(ctx: TracePointContext) -> u32 {
        let Ok(child) = (unsafe { ctx.read_at::<i32>(20) }) else {
            return 0;
        };
        let (tgid, _) = current();
        let now = unsafe { bpf_ktime_get_ns() };
        let state = ThreadState {
            tgid,
            _pad: 0,
            created_ns: now,
            off_cpu_since_ns: now,
        };
        if THREADS.insert(&(child as u32), &state, 0).is_err() {
            count(stat::THREADS_FULL);
        }
        0
    }

    /// `TP_PROTO(struct task_struct *p, bool group_dead)`: a thread is exiting; a wait it was
    /// killed in never returns through `sys_exit_futex`.
    #[btf_tracepoint(function = "sched_process_exit")]
    pub fn thread_exit(_ctx: BtfTracePointContext) -> i32 {
        end_wait();
        0
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 4] = *b"GPL\0";
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
