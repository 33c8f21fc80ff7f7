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
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod probes {
    use aya_ebpf::{
        helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user},
        macros::{btf_tracepoint, map, uprobe},
        maps::{HashMap, PerCpuArray, RingBuf},
        programs::{BtfTracePointContext, ProbeContext},
    };
    use monitor_ebpf::{
        GoKey, GoPhase, GoProc, GoState, MAX_GO_PROCS, MAX_GOROUTINES, PROC_EVENT_EXEC,
        PROC_EVENTS_BYTES, ProcEvent, stat,
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
