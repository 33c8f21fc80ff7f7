//! Types shared by leakmon's kernel programs (`src/main.rs`, BPF target) and its userspace
//! daemon. Everything here is `#[repr(C)]` plain data: both sides read the same bytes.
#![no_std]

/// Names of the maps and programs, so both sides spell them once.
pub mod names {
    pub const GO_PROCS: &str = "GO_PROCS";
    pub const GOROUTINES: &str = "GOROUTINES";
    pub const STATS: &str = "STATS";
    pub const PROC_EVENTS: &str = "PROC_EVENTS";

    pub const GO_PARK: &str = "go_park";
    pub const GO_PREEMPT: &str = "go_preempt";
    pub const GO_EXIT: &str = "go_exit";
    pub const PROC_EXEC: &str = "proc_exec";

    pub const THREAD_WAITS: &str = "THREAD_WAITS";
    pub const THREADS: &str = "THREADS";

    pub const SCHED_SWITCH: &str = "sched_switch";
    pub const THREAD_FORK: &str = "thread_fork";
    pub const THREAD_EXIT: &str = "thread_exit";

    pub const POLL_SAMPLE: &str = "poll_sample";
    pub const SAMPLES: &str = "SAMPLES";

    /// Global set at load: offset of `pid` in the kernel's `struct task_struct`, from its BTF
    /// (`tgid` follows it).
    pub const TASK_PID_OFFSET: &str = "TASK_PID_OFFSET";
}

/// Default capacity of [`names::GOROUTINES`]; userspace may resize it before load.
pub const MAX_GOROUTINES: u32 = 262_144;
/// Capacity of [`names::GO_PROCS`]: processes watched at once.
pub const MAX_GO_PROCS: u32 = 4_096;
/// Size in bytes of the process exec ring buffer.
pub const PROC_EVENTS_BYTES: u32 = 64 * 1024;

/// Capacity of [`names::THREAD_WAITS`]: futex waits in flight at once, host-wide.
pub const MAX_THREAD_WAITS: u32 = 65_536;
/// Default capacity of [`names::THREADS`]: threads known at once, host-wide. Preallocated
/// (it is written from the scheduler): about 72 bytes of kernel memory per entry.
pub const MAX_THREADS: u32 = 65_536;
/// Capacity of [`names::SAMPLES`]: threads sampled at once, host-wide.
pub const MAX_SAMPLED_THREADS: u32 = 256;
/// Samples kept per sampled thread (the last ones): a power of two.
pub const SAMPLE_RING: usize = 64;

/// Default share of [`names::GOROUTINES`] one process may fill.
pub const DEFAULT_GO_QUOTA: u32 = 65_536;

/// Per-process parameters the probes need: read from the binary by userspace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GoProc {
    /// Offset of `goid` inside `runtime.g`.
    pub goid_offset: u32,
    /// Offset of `trackingSeq` (uint8) inside `runtime.g`.
    pub tracking_seq_offset: u32,
    /// Records this process has in [`names::GOROUTINES`]: counted up by the probes, set to
    /// the true count by userspace at each scan (not atomically: see the probes' `store`).
    pub records: u64,
    /// Records it may have: one process cannot fill the map for every other.
    pub quota: u64,
}

/// Key of one goroutine: (process, goroutine id). Goroutine ids are never reused in a process;
/// `g` structs are, so the `g` address is not a key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GoKey {
    pub tgid: u32,
    pub _pad: u32,
    pub goid: u64,
}

/// What the probes last saw a goroutine do.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GoPhase {
    /// Parked by `runtime.gopark` (blocked; `reason` says on what).
    Parked = 1,
    /// Rescheduled without parking (preempted after running 10ms, or `runtime.Gosched`), and
    /// not parked since.
    Running = 2,
}

/// State of one goroutine, kept up to date in place by the probes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GoState {
    /// Address of the goroutine's `runtime.g` (for userspace to read its stack and creation site).
    pub g: u64,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) when the current phase began: when it parked, or
    /// when it was first preempted after its last park.
    pub since_ns: u64,
    /// When it was last seen running (preempted, or parking).
    pub last_run_ns: u64,
    /// `gopark`'s `lock` argument: the object waited on (e.g. inside the channel).
    pub wait_obj: u64,
    /// Preemptions since the phase began: a goroutine that keeps running without parking counts
    /// up here.
    pub runs: u32,
    /// A [`GoPhase`] value.
    pub phase: u8,
    /// `gopark`'s `waitReason` (numbering is per Go version: userspace names it).
    pub reason: u8,
    /// `g.trackingSeq` at the last preemption: it counts transitions out of running, so one
    /// more at the next preemption means the goroutine neither parked nor made a system call.
    pub seq: u8,
    pub _pad: u8,
}

/// Indexes into the per-CPU [`names::STATS`] counters.
pub mod stat {
    pub const PARKS: u32 = 0;
    pub const PREEMPTS: u32 = 1;
    pub const EXITS: u32 = 2;
    /// A goroutine could not be recorded: the map was full.
    pub const MAP_FULL: u32 = 3;
    /// The `g` could not be read (should not happen; counted to be sure).
    pub const READ_ERRORS: u32 = 4;
    /// An exec event did not fit in the ring buffer.
    pub const PROC_EVENTS_LOST: u32 = 5;
    /// A futex wait could not be recorded: [`super::names::THREAD_WAITS`] was full.
    pub const THREAD_WAITS_FULL: u32 = 6;
    /// A thread could not be recorded: [`super::names::THREADS`] was full.
    pub const THREADS_FULL: u32 = 7;
    /// A goroutine was not recorded: its process had its quota of the map.
    pub const GO_QUOTA_FULL: u32 = 8;
    pub const COUNT: u32 = 9;
}

/// Process event sent to userspace through [`names::PROC_EVENTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcEvent {
    pub tgid: u32,
    /// [`PROC_EVENT_EXEC`].
    pub kind: u32,
}
pub const PROC_EVENT_EXEC: u32 = 1;

/// The last futex wait a thread slept in, keyed by thread id in [`names::THREAD_WAITS`]:
/// written when it goes to sleep in one, removed when it exits. It may be over: userspace
/// checks /proc before judging a wait that looks long.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FutexWait {
    pub tgid: u32,
    /// The kind of wait: [`FUTEX_WAIT`] (also FUTEX_WAIT_BITSET and futex2's futex_wait),
    /// [`FUTEX_LOCK_PI`], [`FUTEX_WAIT_REQUEUE_PI`] or [`FUTEX_OP_WAITV`].
    pub op: u32,
    /// The futex word waited on (the first one for `futex_waitv`).
    pub uaddr: u64,
    /// The value the caller expected the word to hold.
    pub val: u32,
    /// [`WAIT_TIMED`], [`WAIT_FROM_PROC`].
    pub flags: u32,
    /// `bpf_ktime_get_ns` when the wait began (when leakmon started, for [`WAIT_FROM_PROC`]).
    pub since_ns: u64,
}

/// The wait has a timeout: it ends by itself.
pub const WAIT_TIMED: u32 = 1;
/// Recorded by userspace from /proc at start, not by a probe: the wait began earlier.
pub const WAIT_FROM_PROC: u32 = 2;
/// [`FutexWait::op`] values: the futex(2) commands, and one for `futex_waitv`.
pub const FUTEX_WAIT: u32 = 0;
pub const FUTEX_LOCK_PI: u32 = 6;
pub const FUTEX_WAIT_REQUEUE_PI: u32 = 11;
pub const FUTEX_OP_WAITV: u32 = 0x1_0000;

/// What the scheduler probes know of one thread, keyed by thread id in [`names::THREADS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadState {
    pub tgid: u32,
    pub _pad: u32,
    /// When the thread was created (0: before leakmon started).
    pub created_ns: u64,
    /// When it last left a CPU: while it is off-CPU, since when.
    pub off_cpu_since_ns: u64,
}

/// The user registers of one thread at its last [`SAMPLE_RING`] samples, keyed by thread id
/// in [`names::SAMPLES`]: userspace adds the entry to sample a thread (a suspect tokio
/// worker), attaches the perf event, and removes the entry when done. Samples taken while
/// the thread was in the kernel are not kept.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegSamples {
    /// Samples taken; the latest is at `(n - 1) % SAMPLE_RING`.
    pub n: u64,
    pub ip: [u64; SAMPLE_RING],
    pub sp: [u64; SAMPLE_RING],
    pub bp: [u64; SAMPLE_RING],
    /// Every general-purpose register at the latest sample (rax, rbx, rcx, rdx, rsi, rdi,
    /// rbp, r8-r15): what a running Go goroutine may hold its only reference to an object in.
    pub gprs: [u64; GPRS],
}

/// General-purpose registers kept of a sample ([`RegSamples::gprs`]).
pub const GPRS: usize = 15;

impl Default for RegSamples {
    fn default() -> Self {
        Self {
            n: 0,
            ip: [0; SAMPLE_RING],
            sp: [0; SAMPLE_RING],
            bp: [0; SAMPLE_RING],
            gprs: [0; GPRS],
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are #[repr(C)] plain integers with explicit padding: any byte pattern is valid.
    unsafe impl aya::Pod for super::GoProc {}
    unsafe impl aya::Pod for super::GoKey {}
    unsafe impl aya::Pod for super::GoState {}
    unsafe impl aya::Pod for super::ProcEvent {}
    unsafe impl aya::Pod for super::FutexWait {}
    unsafe impl aya::Pod for super::ThreadState {}
    unsafe impl aya::Pod for super::RegSamples {}
}
