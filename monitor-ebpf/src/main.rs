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
//! Thread probes watch every process on the host from the scheduler: when each thread last
//! left a CPU (`THREADS`) and, for threads asleep in a futex wait, the wait (`THREAD_WAITS`,
//! one entry per thread, replaced or dropped at its next switch). Both are updated in place;
//! no event leaves the kernel per wait or switch, and stacks are taken by userspace, only for
//! the few waits that last.
//!
//! `poll_sample` runs on a CPU-clock perf event that userspace opens for a few threads at a
//! time, on demand (a tokio worker that may be computing in one poll): it keeps the thread's
//! last user registers, so userspace can find the task polled on its stack and unwind it.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod probes {
    use aya_ebpf::{
        bindings::pt_regs,
        helpers::{
            bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user,
            generated::{bpf_get_current_task_btf, bpf_task_pt_regs},
        },
        macros::{btf_tracepoint, map, perf_event, uprobe},
        maps::{HashMap, PerCpuArray, RingBuf},
        programs::{BtfTracePointContext, PerfEventContext, ProbeContext},
    };
    use monitor_ebpf::{
        FUTEX_LOCK_PI, FUTEX_OP_WAITV, FUTEX_WAIT, FUTEX_WAIT_REQUEUE_PI, FutexWait, GoKey,
        GoPhase, GoProc, GoState, MAX_GO_PROCS, MAX_GOROUTINES, MAX_SAMPLED_THREADS,
        MAX_THREAD_WAITS, MAX_THREADS, PROC_EVENT_EXEC, PROC_EVENTS_BYTES, ProcEvent, RegSamples,
        SAMPLE_RING, ThreadState, WAIT_TIMED, stat,
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

    /// Preallocated: written from the scheduler, where allocating is refused or warned about
    /// on some kernels. Sized by userspace (`max_threads`).
    #[map]
    static THREADS: HashMap<u32, ThreadState> = HashMap::with_max_entries(MAX_THREADS, 0);

    /// Threads userspace samples now (an entry each, added before their perf event is opened).
    #[map]
    static SAMPLES: HashMap<u32, RegSamples> = HashMap::with_max_entries(MAX_SAMPLED_THREADS, 0);

    /// Offset of `pid` in `struct task_struct`, set by userspace from the kernel's BTF at load
    /// (`tgid` is the next field).
    #[unsafe(no_mangle)]
    static TASK_PID_OFFSET: u32 = 0;

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

    /// Records a goroutine: in place when it has a record, else as a new one within its
    /// process's quota.
    #[inline(always)]
    fn store(key: &GoKey, state: &GoState) {
        if let Some(slot) = GOROUTINES.get_ptr_mut(key) {
            // SAFETY: the goroutine runs on one thread at a time, so its entry has one writer.
            unsafe { *slot = *state };
            return;
        }
        let Some(proc) = GO_PROCS.get_ptr_mut(&key.tgid) else {
            return;
        };
        // SAFETY: a live map value. The count is not atomic (the BPF target has no atomic
        // add here): CPUs racing may lose a count, and userspace sets the true one at each
        // scan, so the quota holds to within a scan's worth of races.
        let proc = unsafe { &mut *proc };
        if proc.records >= proc.quota {
            count(stat::GO_QUOTA_FULL);
            return;
        }
        if GOROUTINES.insert(key, state, 0).is_err() {
            count(stat::MAP_FULL);
        } else {
            proc.records += 1;
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
            if GOROUTINES.remove(&key).is_ok()
                && let Some(proc) = GO_PROCS.get_ptr_mut(&key.tgid)
            {
                // SAFETY: a live map value; see `store` for the count's precision.
                let proc = unsafe { &mut *proc };
                proc.records = proc.records.saturating_sub(1);
            }
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

    /// The futex wait a thread that is going to sleep is entering, from the system call it is
    /// in (its user registers): (op, uaddr, val, timed). None when it sleeps for anything
    /// else. Reading it here, when a thread blocks, costs nothing to system calls: tracing
    /// the futex syscall tracepoints would send every system call of every task through the
    /// kernel's slow tracing path, and fentry needs ftrace, which hosts may forbid.
    #[inline(always)]
    fn futex_wait_of_current() -> Option<(u32, u64, u32, bool)> {
        const SYS_FUTEX: u64 = 202;
        const SYS_FUTEX_WAITV: u64 = 449;
        const SYS_FUTEX_WAIT: u64 = 455;
        // SAFETY: the BTF task pointer of the current task; its saved user registers are read
        // with bpf_probe_read_kernel.
        // bpf_task_pt_regs returns a BTF pointer: the verifier lets fields be loaded from it
        // directly (fault-safe loads), far cheaper than bpf_probe_read_kernel.
        let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) as *const pt_regs };
        // SAFETY: a BTF-typed kernel pointer; loads from it are checked and fault-safe.
        let field = |f: *const u64| unsafe { core::ptr::read_volatile(f) };
        // The system call number first: most sleeps are not in a futex wait.
        let nr = field(unsafe { core::ptr::addr_of!((*regs).orig_rax) });
        if !matches!(nr, SYS_FUTEX | SYS_FUTEX_WAITV | SYS_FUTEX_WAIT) {
            return None;
        }
        let arg = |i: usize| {
            field(unsafe {
                match i {
                    0 => core::ptr::addr_of!((*regs).rdi),
                    1 => core::ptr::addr_of!((*regs).rsi),
                    2 => core::ptr::addr_of!((*regs).rdx),
                    3 => core::ptr::addr_of!((*regs).r10),
                    _ => core::ptr::addr_of!((*regs).r8),
                }
            })
        };
        match nr {
            // futex(uaddr, op, val, utime, ...): the operations that block.
            SYS_FUTEX => {
                let op = match arg(1) as u32 & 127 {
                    0 | 9 => FUTEX_WAIT,
                    6 | 13 => FUTEX_LOCK_PI,
                    11 => FUTEX_WAIT_REQUEUE_PI,
                    _ => return None,
                };
                Some((op, arg(0), arg(2) as u32, arg(3) != 0))
            }
            // futex_waitv(waiters, nr, flags, timeout, clockid): the first futex of
            // `struct futex_waitv { u64 val; u64 uaddr; ... }`.
            SYS_FUTEX_WAITV => {
                let waiters = arg(0);
                // SAFETY: bpf_probe_read_user validates the user address.
                let (val, uaddr) = unsafe {
                    (
                        bpf_probe_read_user(waiters as *const u64).unwrap_or(0),
                        bpf_probe_read_user((waiters + 8) as *const u64).unwrap_or(0),
                    )
                };
                Some((FUTEX_OP_WAITV, uaddr, val as u32, arg(3) != 0))
            }
            // futex2 futex_wait(uaddr, val, mask, flags, timeout, clockid) (Linux 6.7+).
            SYS_FUTEX_WAIT => Some((FUTEX_WAIT, arg(0), arg(1) as u32, arg(4) != 0)),
            _ => None,
        }
    }

    /// `TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next,
    /// unsigned int prev_state)` (Linux 5.18+). Runs on every context switch, in `prev`'s
    /// context: records when it left the CPU and, when it goes to sleep in a futex wait, the
    /// wait. A dying thread's last switch drops it.
    #[btf_tracepoint(function = "sched_switch")]
    pub fn sched_switch(ctx: BtfTracePointContext) -> i32 {
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
        // Asleep (not preempted) in a futex wait: record it, in place when the thread has a
        // record (an update would take and free an element each time). A record left by an
        // earlier wait is not removed here, which would cost every other sleep a lookup:
        // userspace checks in /proc that a long wait is still on.
        if prev_state == 0 {
            return 0;
        }
        if let Some((op, uaddr, val, timed)) = futex_wait_of_current() {
            let wait = FutexWait {
                tgid,
                op,
                uaddr,
                val,
                flags: if timed { WAIT_TIMED } else { 0 },
                since_ns: now,
            };
            match THREAD_WAITS.get_ptr_mut(&tid) {
                // SAFETY: only this thread's own switches write its entry.
                Some(slot) => unsafe { *slot = wait },
                None => {
                    if THREAD_WAITS.insert(&tid, &wait, 0).is_err() {
                        count(stat::THREAD_WAITS_FULL);
                    }
                }
            }
        }
        0
    }

    /// `TP_PROTO(struct task_struct *parent, struct task_struct *child)`: a new thread or
    /// process. The child's pid and tgid are read at the offsets the kernel's BTF gives
    /// (userspace sets them at load), not at a tracepoint layout that changes across kernels.
    #[btf_tracepoint(function = "sched_process_fork")]
    pub fn thread_fork(ctx: BtfTracePointContext) -> i32 {
        let child: u64 = ctx.arg(1);
        // SAFETY: a plain read of a constant global.
        let offset = unsafe { core::ptr::read_volatile(&TASK_PID_OFFSET) };
        if offset == 0 {
            return 0;
        }
        // SAFETY: bpf_probe_read_kernel checks the address; `pid` and `tgid` are adjacent.
        let Ok(ids) =
            (unsafe { bpf_probe_read_kernel((child + u64::from(offset)) as *const [i32; 2]) })
        else {
            return 0;
        };
        let (pid, tgid) = (ids[0] as u32, ids[1] as u32);
        let now = unsafe { bpf_ktime_get_ns() };
        let state = ThreadState {
            tgid,
            _pad: 0,
            created_ns: now,
            off_cpu_since_ns: now,
        };
        if THREADS.insert(&pid, &state, 0).is_err() {
            count(stat::THREADS_FULL);
        }
        0
    }

    /// `TP_PROTO(struct task_struct *p, bool group_dead)`: a thread is exiting (its last
    /// context switch, with TASK_DEAD, drops the rest).
    #[btf_tracepoint(function = "sched_process_exit")]
    pub fn thread_exit(_ctx: BtfTracePointContext) -> i32 {
        let (_, tid) = current();
        let _ = THREAD_WAITS.remove(&tid);
        0
    }

    /// A CPU-clock sample of a thread userspace asked for (`SAMPLES` has its entry): its user
    /// instruction, stack and frame pointers, when the sample interrupted user code.
    #[perf_event]
    pub fn poll_sample(ctx: PerfEventContext) -> u32 {
        let tid = bpf_get_current_pid_tgid() as u32;
        let Some(slot) = SAMPLES.get_ptr_mut(&tid) else {
            return 0;
        };
        // SAFETY: the context is the kernel's bpf_perf_event_data; its regs are readable.
        let (cs, ip, sp, bp) = unsafe {
            let regs = &(*ctx.ctx).regs;
            (regs.cs, regs.rip, regs.rsp, regs.rbp)
        };
        // SAFETY: as above.
        let gprs = unsafe {
            let r = &(*ctx.ctx).regs;
            [
                r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12,
                r.r13, r.r14, r.r15,
            ]
        };
        // Ring 3: the sample interrupted user code (else these are kernel registers).
        if cs & 3 != 3 {
            return 0;
        }
        // SAFETY: a live map value; a thread is sampled on one CPU at a time.
        let slot = unsafe { &mut *slot };
        let i = (slot.n as usize) & (SAMPLE_RING - 1);
        slot.ip[i] = ip;
        slot.sp[i] = sp;
        slot.bp[i] = bp;
        slot.gprs = gprs;
        slot.n += 1;
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
