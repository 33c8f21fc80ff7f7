//! One watched Go process: its binary, its memory, its probes, and what was learnt about its
//! goroutines (cached: a goroutine parked at one place stays there until it parks again).

use std::{
    collections::{HashMap, HashSet},
    num::NonZeroU32,
    path::PathBuf,
    sync::Arc,
};

use monitor_ebpf::{GoPhase, GoProc, names};

use super::{
    Frame, GoBinary, GoError,
    budget::ReachBudget,
    heap::Heap,
    reach, stackmaps,
    task::{self, GRecord, pick_frame},
    waits::{self, WaitClass, WaitKind, WaitObject},
};
use crate::{
    bpf::{BpfError, Links, Probes, TaskRecord, TaskRecords},
    detect::Policy as _,
    detect::{Due, ObjectState, Observation, Site, Stack, TaskState, WaitsOn},
    proc::{self, BinaryKey, ProcError, ProcMem},
    runtime::{Census, Process, ProcessInfo, ScanInput, Scanned, TaskSource},
};

mod dump;

#[derive(Debug, thiserror::Error)]
pub(crate) enum TargetError {
    #[error(transparent)]
    Proc(#[from] ProcError),
    #[error(transparent)]
    Go(#[from] GoError),
    #[error(
        "its goroutine table (runtime.allgs) was not found (parks are probed instead): its \
         goroutines cannot be listed"
    )]
    NoTable,
}

/// What a goroutine's `g` and stack said, keyed by the phase start it was read for.
#[derive(Clone, Debug)]
struct Resolved {
    since_ns: u64,
    created_at: Option<Arc<Site>>,
    entry: Arc<str>,
    blocked_at: Option<Arc<Site>>,
    stack: Option<Stack>,
    /// What it waits on (candidates for the reachability analysis only), once known.
    waits: Option<Arc<[WaitObject]>>,
    /// Scans its lock wait was held back for, awaiting the analyses' verdict.
    held: u8,
}

/// One shared copy of each site and name (a leak is thousands of goroutines with the same few).
#[derive(Default)]
struct Interner {
    sites: HashSet<Arc<Site>>,
    names: HashSet<Arc<str>>,
    stacks: HashSet<Stack>,
}

impl Interner {
    fn site(&mut self, site: Site) -> Arc<Site> {
        if let Some(s) = self.sites.get(&site) {
            return Arc::clone(s);
        }
        let s = Arc::new(site);
        self.sites.insert(Arc::clone(&s));
        s
    }

    fn stack(&mut self, sites: Vec<Site>) -> Stack {
        let stack: Stack = sites.into_iter().map(|s| self.site(s)).collect();
        if let Some(s) = self.stacks.get(&stack) {
            return Arc::clone(s);
        }
        self.stacks.insert(Arc::clone(&stack));
        stack
    }

    fn name(&mut self, name: &str) -> Arc<str> {
        if let Some(n) = self.names.get(name) {
            return Arc::clone(n);
        }
        let n: Arc<str> = Arc::from(name);
        self.names.insert(Arc::clone(&n));
        n
    }
}

pub(crate) struct Target {
    pid: u32,
    start_time: u64,
    key: BinaryKey,
    exe: PathBuf,
    binary: Arc<GoBinary>,
    info: ProcessInfo,
    bias: u64,
    mem: ProcMem,
    /// Where the probes go: (program, file offset), read from the executable at inspection.
    probe_sites: Vec<(&'static str, u64)>,
    resolved: HashMap<u64, Resolved>,
    interned: Interner,
    /// Parks seen by the last goroutine-table scan, by goid.
    parks: HashMap<u64, Park>,
    /// Entry function name by start PC (naming a wrapper's callee reads code).
    entries: HashMap<u64, Arc<str>>,
    /// Whether the function at each start PC is the runtime's own (its goroutines are not
    /// counted, as `runtime.NumGoroutine` leaves them out).
    system: HashMap<u64, bool>,
    /// Creation site by `go`-statement PC: a leak's goroutines share one.
    creation_sites: HashMap<u64, Option<Arc<Site>>>,
    /// Address of `runtime.allgs` when parks are found by scanning; `None` when probed.
    scan: Option<u64>,
    /// Goroutines the last reachability analysis found leaked, and what they wait on: a
    /// proof needs two analyses in a row that agree.
    leaked: HashMap<u64, Arc<[WaitObject]>>,
    /// Goroutines proven leaked (two analyses in a row agreed), while they stay parked on
    /// the same objects.
    proven: HashMap<u64, Arc<[WaitObject]>>,
    /// The candidates of the last two analyses, what they waited on and whether they were
    /// found leaked: a candidate both found the same way is settled, and analyses back off
    /// while every candidate is.
    analysed: [Analysed; 2],
    /// Whether the next scan should run an analysis (it gathers the roots as it reads the
    /// goroutine table): some candidate is not settled, or a recheck is due.
    analysis_due: bool,
    /// When settled candidates are analysed again (what they wait on may have been dropped
    /// since), and the back-off that set it.
    recheck_at_ns: u64,
    recheck_backoff_ns: u64,
    /// Reachability analyses run (the first is logged at info).
    analyses: u64,
    /// What the analyses may spend, shared by every process.
    reach: Arc<ReachBudget>,
    /// The runtime's stack maps by PC, as the analyses read them.
    frame_maps: stackmaps::MapCache,
    /// Locks candidates wait on, and who holds each, as the last analysis found.
    lock_holders: HashMap<u64, Arc<str>>,
    /// The globals as roots, with the runtime's pointer bitmaps, once read.
    globals: Option<Arc<[reach::Globals]>>,
    /// How the last analysis read memory, for the alerts it proves.
    marking: Option<Arc<str>>,
    /// Samples the registers of threads on a CPU for analyses (set when attached).
    sampler: Option<Arc<crate::bpf::Sampler>>,
}

impl TaskSource for Target {
    fn process(&self) -> &ProcessInfo {
        &self.info
    }

    fn start_time(&self) -> u64 {
        self.start_time
    }

    /// The probes found by [`Target::inspect`].
    fn attach(&mut self, probes: &mut Probes) -> Result<Option<Links>, BpfError> {
        let Some(pid) = NonZeroU32::new(self.pid) else {
            return Ok(None);
        };
        let params = GoProc {
            goid_offset: self.binary.offsets.goid,
            tracking_seq_offset: self.binary.offsets.tracking_seq,
            ..GoProc::default()
        };
        let links = probes.attach_uprobes(pid, params, &self.probe_sites)?;
        self.sampler = Some(probes.sampler());
        log::info!(
            "watching PID {} ({}, {}{}, offsets from {:?}, parks seen by {})",
            self.pid,
            self.exe.display(),
            self.binary.version,
            if self.binary.has_dwarf {
                ""
            } else {
                ", stripped"
            },
            self.binary.offset_source,
            if self.scan.is_some() {
                "scanning runtime.allgs"
            } else {
                "gopark probe"
            },
        );
        Ok(Some(links))
    }

    fn scan(&mut self, input: ScanInput) -> Scanned {
        if !self.runs_same_program() {
            return Scanned::OtherProgram;
        }
        let (tasks, stale, census) = Target::scan(self, &input.records, &input.due);
        Scanned::Tasks {
            tasks,
            stale,
            policy: &super::GO,
            census,
            marking: self.marking.clone(),
        }
    }

    fn dump(
        &mut self,
        now_ns: u64,
        limit: usize,
        notes: &mut Vec<String>,
    ) -> Result<Vec<crate::dump::Task>, crate::runtime::RuntimeError> {
        Ok(self.dump_goroutines(now_ns, limit, notes)?)
    }
}

/// Upper bound on goroutines read per scan (allgs includes dead ones awaiting reuse).
const MAX_GS: usize = 4 << 20;
/// Goroutines read per batch of `process_vm_readv` calls.
const READ_CHUNK: usize = 4096;
/// Spans of a heap read for an analysis, at most (1M spans is 8 GiB of small-object heap).
const MAX_SPANS: usize = 1 << 20;
/// A goroutine parked past the block threshold on a wait whose object can prove a leak.
struct Candidate {
    /// Its observation among those judged this scan.
    index: usize,
    /// Address of its `g`.
    g: u64,
    rec: GRecord,
    class: WaitClass,
}

/// What one analysis found: goid -> (what it waited on, found leaked).
type Analysed = HashMap<u64, (Arc<[WaitObject]>, bool)>;

/// Back-off of analyses while every candidate is settled (found the same by two analyses):
/// from 30 s, doubling, up to 10 minutes.
const RECHECK_MIN_NS: u64 = 30_000_000_000;
const RECHECK_MAX_NS: u64 = 600_000_000_000;
/// Scans a lock wait is held back for at most, awaiting the analyses (a proof takes two, the
/// first a scan after the wait is due).
const HOLD_SCANS: u8 = 5;
/// Objects (channels, locks) whose state is read per scan, at most (for the alerts: one per
/// group is enough).
const MAX_STATE_READS: usize = 256;

/// How an analysis read the program's memory, as alerts say it: stacks by their stack maps
/// (or whole, where the tables did not describe a frame), globals by the runtime's pointer
/// bitmaps (or whole), heap objects whole (span pointer information is not read yet).
fn marking(outcome: &reach::Outcome, globals_by: &str) -> Arc<str> {
    let stacks = match (outcome.precise_stacks, outcome.conservative_stacks) {
        (_, 0) => "stacks by their stack maps".to_owned(),
        (0, _) => "stacks whole".to_owned(),
        (p, c) => format!("stacks by their stack maps ({c} of {} whole)", p + c),
    };
    format!("{stacks}, globals {globals_by}, heap objects whole").into()
}

/// Threads on a CPU whose registers are sampled for an analysis, at most, and for how long.
const MAX_SAMPLED_THREADS: usize = 64;
const REGISTER_WINDOW: std::time::Duration = std::time::Duration::from_millis(5);

/// Largest pointer bitmap of a global section read (1 MiB covers 64 MiB of globals).
const MAX_GLOBALS_MASK: u64 = 1 << 20;

/// The pointer bitmap of the globals section at `start` (`len` bytes), from the live
/// `moduledata` at `md`: the section's start at `base`, its `bitvector` at `mask`. `None`
/// when it does not describe that section exactly.
fn globals_mask(
    mem: &ProcMem,
    md: u64,
    base: u32,
    mask: u32,
    start: u64,
    len: u64,
) -> Option<Arc<[u8]>> {
    let section = mem.read_u64(md + u64::from(base))?;
    let n = mem.read_u64(md + u64::from(mask))? & 0xffff_ffff;
    let bytedata = mem.read_u64(md + u64::from(mask) + 8)?;
    // n bits, one per word of the section (`modulesinit`: (edata - data) / 8).
    if section != start || n == 0 || n != len / 8 || bytedata == 0 {
        return None;
    }
    let bytes = n.div_ceil(8);
    if bytes > MAX_GLOBALS_MASK {
        return None;
    }
    let mut buf = vec![0u8; bytes as usize];
    mem.read(bytedata, &mut buf).then(|| buf.into())
}

/// The part of a goroutine's stack in use: from its saved `sched.sp` when descheduled, the
/// whole stack when running or in a system call (what is saved is stale), or when the saved
/// value is not inside it.
fn live_stack(rec: &GRecord) -> (u64, u64) {
    let descheduled = matches!(
        rec.status,
        task::G_RUNNABLE | task::G_WAITING | task::G_PREEMPTED | task::G_LEAKED
    );
    if descheduled && rec.sched_sp >= rec.stack_lo && rec.sched_sp <= rec.stack_hi {
        (rec.sched_sp, rec.stack_hi)
    } else {
        (rec.stack_lo, rec.stack_hi)
    }
}

/// A park seen by scanning, and since when it has looked the same.
struct Park {
    /// (stack depth, wait reason, trackingSeq). Not sched.pc: every park saves the same
    /// return address in gopark. Not sched.sp: the GC moves parked goroutines' stacks.
    signature: (u64, u8, u8),
    since_ns: u64,
}

impl Park {
    /// What a park of `rec` looks like from scan to scan.
    fn signature(rec: &GRecord) -> (u64, u8, u8) {
        (rec.stack_depth, rec.waitreason, rec.tracking_seq)
    }
}

/// What the probes or the scan saw of a goroutine.
#[derive(Clone, Copy)]
enum Seen {
    Parked {
        since_ns: u64,
        reason: u8,
    },
    Running {
        since_ns: u64,
        runs: u32,
        last_run_ns: u64,
    },
}

impl Target {
    /// Inspects `pid`: its executable, memory and container, and where its probes go. Reads
    /// only what the target controls, so it runs on a worker, with a deadline.
    pub(crate) fn inspect(
        process: &Process,
        binary: Arc<GoBinary>,
        probe_parks: bool,
        reach: Arc<ReachBudget>,
    ) -> Result<Self, TargetError> {
        let (pid, key, exe) = (process.pid, process.key, process.exe.clone());
        let (_, start_time) = proc::stat(pid)?;
        let site = |f| binary.probe_site(f).map(|s| s.file_offset);
        // Parks are found by scanning the goroutine table, or (asked for, or the table cannot
        // be found) by probing every park and exit, which costs on the hot path.
        let mut probe_sites = vec![(names::GO_PREEMPT, site(super::GOSCHED_IMPL)?)];
        let scan = (!probe_parks).then_some(binary.allgs).flatten();
        if scan.is_none() {
            probe_sites.push((names::GO_PARK, site(super::GOPARK)?));
            probe_sites.push((names::GO_EXIT, site(super::GOEXIT1)?));
        }
        let bias = if binary.pie {
            proc::load_bias(pid, binary.lowest_vaddr())?
        } else {
            0
        };
        let mem = ProcMem::open(pid)?;
        let info = ProcessInfo::of(process, binary.version.to_string());
        Ok(Self {
            pid,
            start_time,
            key,
            exe,
            info,
            binary,
            bias,
            mem,
            probe_sites,
            resolved: HashMap::new(),
            interned: Interner::default(),
            parks: HashMap::new(),
            entries: HashMap::new(),
            system: HashMap::new(),
            creation_sites: HashMap::new(),
            scan,
            leaked: HashMap::new(),
            proven: HashMap::new(),
            analysed: Default::default(),
            analysis_due: false,
            recheck_at_ns: 0,
            recheck_backoff_ns: RECHECK_MIN_NS,
            analyses: 0,
            reach,
            frame_maps: stackmaps::MapCache::default(),
            lock_holders: HashMap::new(),
            globals: None,
            marking: None,
            sampler: None,
        })
    }

    /// Whether the process still runs the executable inspected (an exec replaces it).
    /// Also brings up to date which of its memory is mapped from FUSE files (not read).
    fn runs_same_program(&mut self) -> bool {
        proc::runs_same_program(self.pid, self.key, &mut self.mem)
    }

    /// Whether the process still runs the program inspected.
    fn is_alive(&mut self) -> bool {
        proc::stat(self.pid).is_ok_and(|(state, start)| state != 'Z' && start == self.start_time)
            && self.runs_same_program()
    }

    /// One scan of this process, on a worker: parked goroutines from its table, and the probes'
    /// records (`entries`) read and judged. Returns what `due` admits and the records found
    /// stale.
    fn scan(
        &mut self,
        entries: &TaskRecords,
        due: &Due,
    ) -> (Vec<Observation>, TaskRecords, Option<Census>) {
        let reach = Arc::clone(&self.reach);
        let (mut goroutines, census) = self.scan_parked(due, &reach);
        let mut stale = TaskRecords::new();
        for (goid, state) in entries {
            let mut is_stale = false;
            if let Some(o) = self.observe(*goid, state, due, &mut is_stale) {
                goroutines.push(o);
            } else if is_stale {
                stale.insert(*goid, *state);
            }
        }
        self.retain_resolved(|g| entries.contains_key(&g));
        (goroutines, stale, census)
    }

    /// Parked goroutines from the goroutine table (`runtime.allgs`), for binaries whose symbol
    /// table or code gives its address. A goroutine counts as parked since the first scan that
    /// saw it parked with the same stack depth, wait reason and `trackingSeq` (which moves on
    /// every park and wake), so a worker re-parking at the same place between scans is a new
    /// park. Those parked at least `min_parked_ns` are returned for judging, with what they
    /// wait on, and proven leaked when two reachability analyses in a row say so.
    fn scan_parked(
        &mut self,
        due: &Due,
        budget: &ReachBudget,
    ) -> (Vec<Observation>, Option<Census>) {
        let now_ns = due.now_ns;
        let Some(allgs) = self.scan else {
            return (Vec::new(), None);
        };
        // Counted by state and wait reason code, named once at the end (100,000 goroutines
        // cost a hash of a small key each).
        let mut counted: HashMap<(&'static str, u8), u64> = HashMap::new();
        let previous = std::mem::take(&mut self.parks);
        let mut judged = Vec::new();
        // Candidates: index into `judged`, and into `roots` when an analysis runs.
        let mut candidates: Vec<Candidate> = Vec::new();
        let analyse = self.analysis_due && self.binary.mheap.is_some() && budget.allows();
        let mut roots: Vec<reach::Goroutine> = Vec::new();
        let gs = task::all_gs(&self.mem, allgs.wrapping_add(self.bias), MAX_GS);
        // In chunks: one buffer for a whole table of 100k goroutines would be ~30 MiB.
        for chunk in gs.chunks(READ_CHUNK) {
            let records = task::read_gs(&self.mem, chunk, &self.binary.offsets);
            for (addr, rec) in chunk.iter().zip(records) {
                let Some(rec) = rec else { continue };
                let parked = matches!(rec.status, task::G_WAITING | task::G_LEAKED);
                if let Some(state) = task::state_name(rec.status)
                    && !self.is_system(rec.startpc)
                {
                    let code = if parked { rec.waitreason } else { 0 };
                    *counted.entry((state, code)).or_default() += 1;
                }
                if analyse && rec.status != task::G_DEAD && rec.status != 0 {
                    let stack = live_stack(&rec);
                    roots.push(reach::Goroutine {
                        g: *addr,
                        goid: rec.goid,
                        stack,
                        // Parked with its stack in place: scanned by its stack maps. With
                        // defer or panic records, whole: the GC scans those records beside
                        // the frames, and a deferred call may be all that holds an object.
                        parked_pc: (parked && !rec.defers && stack.0 == rec.sched_sp)
                            .then_some(rec.sched_pc),
                        candidate: None,
                    });
                }
                if !parked {
                    continue;
                }
                let signature = Park::signature(&rec);
                let since_ns = match previous.get(&rec.goid) {
                    Some(p) if p.signature == signature => p.since_ns,
                    _ => now_ns,
                };
                self.parks.insert(
                    rec.goid,
                    Park {
                        signature,
                        since_ns,
                    },
                );
                if due.parked(since_ns) {
                    let o = self.judge(
                        &rec,
                        Seen::Parked {
                            since_ns,
                            reason: rec.waitreason,
                        },
                    );
                    if let Some(class) = WaitClass::of(self.binary.wait_reason(rec.waitreason))
                        && !o.entry.starts_with("runtime.")
                    {
                        candidates.push(Candidate {
                            index: judged.len(),
                            g: *addr,
                            rec,
                            class,
                        });
                    }
                    judged.push(o);
                }
            }
        }
        let heap = (analyse && !candidates.is_empty())
            .then(|| self.read_heap())
            .flatten();
        self.fill_waits(&candidates, heap.as_ref());
        if let Some(heap) = heap {
            self.prove(&heap, &candidates, roots, budget);
            let settled = candidates
                .iter()
                .all(|c| self.settled(c.rec.goid, self.waits_of(c.rec.goid).as_ref()));
            if settled {
                self.recheck_at_ns = now_ns.saturating_add(self.recheck_backoff_ns);
                self.recheck_backoff_ns = (self.recheck_backoff_ns * 2).min(RECHECK_MAX_NS);
            } else {
                self.recheck_backoff_ns = RECHECK_MIN_NS;
            }
        }
        // Proofs hold while the goroutine stays parked on the same objects.
        let current: HashMap<u64, Option<Arc<[WaitObject]>>> = candidates
            .iter()
            .map(|c| (c.rec.goid, self.waits_of(c.rec.goid)))
            .collect();
        self.proven
            .retain(|goid, w| current.get(goid).is_some_and(|c| c.as_ref() == Some(w)));
        let unsettled = current
            .iter()
            .any(|(goid, w)| !self.settled(*goid, w.as_ref()));
        self.analysis_due = !current.is_empty() && (unsettled || now_ns >= self.recheck_at_ns);
        let proven: HashSet<u64> = self.proven.keys().copied().collect();
        let held = self.hold_lock_waits(&candidates, &proven);
        let mut states = HashMap::new();
        for Candidate { index: i, rec, .. } in &candidates {
            let Some(waits) = self.waits_of(rec.goid) else {
                continue;
            };
            let Some(first) = waits.first() else { continue };
            let state = self.wait_state(first, &mut states, MAX_STATE_READS);
            let o = &mut judged[*i];
            o.proven = proven.contains(&rec.goid);
            o.waits_on = Some(Arc::new(WaitsOn {
                kind: first.kind.as_str(),
                address: first.addr,
                state,
                objects: 1,
            }));
        }
        if !held.is_empty() {
            judged = judged
                .into_iter()
                .enumerate()
                .filter_map(|(i, o)| (!held.contains(&i)).then_some(o))
                .collect();
        }
        let mut census = Census::new(&super::kinds::GOROUTINES);
        for ((state, code), n) in counted {
            // Code 0 is Go's `waitReasonZero`: "".
            let reason = self.interned.name(self.binary.wait_reason(code));
            census.add_n(state, &reason, n);
        }
        (judged, Some(census))
    }

    /// The heap's spans, for an analysis (`None`, said at debug level, when unreadable).
    fn read_heap(&self) -> Option<Heap> {
        let mheap = self.binary.mheap?.wrapping_add(self.bias);
        match Heap::read(&self.mem, mheap, &self.binary.heap, MAX_SPANS) {
            Ok(h) => Some(h),
            Err(e) => {
                log::debug!(
                    "PID {}: heap not read ({e:?}); no proof this scan",
                    self.pid
                );
                None
            }
        }
    }

    /// What each candidate waits on, read once per park (cached with its sites). Semaphore
    /// and Cond waits before go1.26 need the heap (their sudog is found there).
    fn fill_waits(&mut self, candidates: &[Candidate], heap: Option<&Heap>) {
        let legacy_needed = self.binary.version.minor < 26;
        let mut legacy = None;
        for Candidate { g, rec, class, .. } in candidates {
            let class = *class;
            if self
                .resolved
                .get(&rec.goid)
                .is_none_or(|r| r.waits.is_some())
            {
                continue;
            }
            let legacy_map =
                if legacy_needed && class != WaitClass::Channel {
                    let Some(heap) = heap else { continue };
                    Some(&*legacy.get_or_insert_with(|| {
                        waits::sudogs_by_g(&self.mem, heap, &self.binary.heap)
                    }))
                } else {
                    None
                };
            let objects = waits::wait_objects(
                &self.mem,
                &self.binary.heap,
                class,
                *g,
                rec.waiting,
                legacy_map,
            );
            if let Some(r) = self.resolved.get_mut(&rec.goid) {
                r.waits = Some(objects.into());
            }
        }
    }

    /// Every general-purpose register of the process's threads on a CPU, sampled for a
    /// few milliseconds: a goroutine running there may hold its only reference to an object
    /// in one, where no stack scan sees it. (Go keeps no value in a register across a call,
    /// so a goroutine parked, or in a system call, has its references on its stack.)
    fn registers_on_cpu(&self) -> Vec<u64> {
        let Some(sampler) = &self.sampler else {
            return Vec::new();
        };
        let tids = proc::threads_on_cpu(self.pid, MAX_SAMPLED_THREADS);
        if tids.is_empty() {
            return Vec::new();
        }
        let session = sampler.start(&tids);
        if session.is_empty() {
            return Vec::new();
        }
        std::thread::sleep(REGISTER_WINDOW);
        session.registers().into_values().flatten().collect()
    }

    /// Runs one reachability analysis: goroutines found leaked by it and by the one before,
    /// waiting on the same objects, join `proven`.
    fn prove(
        &mut self,
        heap: &Heap,
        candidates: &[Candidate],
        mut goroutines: Vec<reach::Goroutine>,
        budget: &ReachBudget,
    ) {
        let started = std::time::Instant::now();
        let by_g: HashMap<u64, usize> = goroutines
            .iter()
            .enumerate()
            .map(|(i, g)| (g.g, i))
            .collect();
        let mut goid_of: HashMap<usize, (u64, Arc<[WaitObject]>)> = HashMap::new();
        for Candidate { g: addr, rec, .. } in candidates {
            let Some(waits) = self.waits_of(rec.goid) else {
                continue;
            };
            if waits.is_empty() {
                continue;
            }
            if let Some(&i) = by_g.get(addr) {
                goroutines[i].candidate = Some(waits.to_vec());
                goid_of.insert(i, (rec.goid, waits));
            }
        }
        let globals = self.global_roots();
        let registers = self.registers_on_cpu();
        let result = reach::analyse(
            &self.mem,
            heap,
            &self.binary.heap,
            &reach::Roots {
                globals: &globals,
                registers: &registers,
            },
            &goroutines,
            Some(&mut stackmaps::ProcessMaps {
                table: self.binary.pclntab(),
                bias: self.bias,
                cache: &mut self.frame_maps,
            }),
            budget.limit(),
        );
        let bytes = match &result {
            Ok(o) => o.bytes_read,
            Err(_) => budget.limit(),
        };
        budget.charge(bytes, started.elapsed());
        let Ok(outcome) = result else {
            log::debug!(
                "PID {}: reachability analysis gave no verdict ({result:?})",
                self.pid
            );
            self.leaked.clear();
            return;
        };
        self.analyses += 1;
        let level = if self.analyses == 1 {
            log::Level::Info
        } else {
            log::Level::Debug
        };
        let globals_by = if globals.iter().all(|g| g.mask.is_some()) {
            "by the runtime's pointer bitmaps"
        } else {
            "whole"
        };
        log::log!(
            level,
            "PID {}: reachability analysis: {} candidates, {} leaked, {} objects marked, {} KiB \
             read in {:?}; {} stacks scanned by their stack maps, {} whole; globals {globals_by}; \
             registers of {} threads on a CPU",
            self.pid,
            goid_of.len(),
            outcome.leaked.len(),
            outcome.objects_marked,
            outcome.bytes_read >> 10,
            started.elapsed(),
            outcome.precise_stacks,
            outcome.conservative_stacks,
            registers.len() / monitor_ebpf::GPRS,
        );
        self.marking = Some(marking(&outcome, globals_by));
        // A lock's holder is named when one live goroutine alone points to it from its live
        // stack slots (a reference is what unlocking takes; several name none).
        self.lock_holders = outcome
            .holders
            .iter()
            .filter_map(|(lock, found)| {
                let [i] = found[..] else { return None };
                let goid = goroutines.get(i)?.goid;
                let name = match self.resolved.get(&goid) {
                    Some(r) => match &r.blocked_at {
                        Some(site) => format!("goroutine {goid} in {site}"),
                        None => format!("goroutine {goid} in {}", r.entry),
                    },
                    None => format!("goroutine {goid}"),
                };
                Some((*lock, Arc::from(name)))
            })
            .collect();
        let leaked: HashMap<u64, Arc<[WaitObject]>> = outcome
            .leaked
            .iter()
            .filter_map(|i| goid_of.get(i).cloned())
            .collect();
        for (goid, waits) in &leaked {
            if self.leaked.get(goid) == Some(waits) {
                self.proven.insert(*goid, Arc::clone(waits));
            }
        }
        let analysed: Analysed = goid_of
            .into_values()
            .map(|(goid, waits)| {
                let found = leaked.contains_key(&goid);
                (goid, (waits, found))
            })
            .collect();
        // Found live now: a proof no longer stands (it can only have been a torn read).
        self.proven
            .retain(|goid, _| leaked.contains_key(goid) || !analysed.contains_key(goid));
        self.leaked = leaked;
        let [older, last] = &mut self.analysed;
        *older = std::mem::replace(last, analysed);
    }

    /// The state of what a goroutine waits on, as alerts and dumps show it (a channel's
    /// capacity, length and waiters; a lock's state and holder): read once per object, while
    /// `states` holds fewer than `max`.
    fn wait_state(
        &self,
        o: &WaitObject,
        states: &mut HashMap<u64, Option<Arc<ObjectState>>>,
        max: usize,
    ) -> Option<Arc<ObjectState>> {
        if let Some(s) = states.get(&o.addr) {
            return s.clone();
        }
        if states.len() >= max {
            return None;
        }
        let state = match o.kind {
            WaitKind::Channel => {
                waits::chan_state(&self.mem, &self.binary.heap, o.addr).map(|c| c.described())
            }
            WaitKind::Lock => waits::lock_state(&self.mem, o.addr).map(|mut l| {
                l.holder = self.lock_holders.get(&o.addr).cloned();
                l.described()
            }),
            WaitKind::Semaphore | WaitKind::Cond => None,
        }
        .map(Arc::new);
        states.insert(o.addr, state.clone());
        state
    }

    /// The globals, roots of every analysis: `.data` and `.bss` by the runtime's own pointer
    /// bitmaps of them where they can be read (kept: they never change once the program
    /// runs), else whole.
    fn global_roots(&mut self) -> Arc<[reach::Globals]> {
        if let Some(g) = &self.globals {
            return Arc::clone(g);
        }
        let md = self
            .binary
            .moduledata
            .map(|(at, off)| (at.wrapping_add(self.bias), off));
        let mut precise = true;
        let roots: Arc<[reach::Globals]> = self
            .binary
            .globals
            .iter()
            .enumerate()
            .map(|(i, (start, len))| {
                let start = start.wrapping_add(self.bias);
                // `.data` then `.bss`, as `GoBinary::globals` lists them.
                let mask = md.and_then(|(md, off)| {
                    let (base, mask) = match i {
                        0 => (off.data, off.gcdatamask),
                        _ => (off.bss, off.gcbssmask),
                    };
                    globals_mask(&self.mem, md, base, mask, start, *len)
                });
                precise &= mask.is_some();
                reach::Globals {
                    start,
                    len: *len,
                    mask,
                }
            })
            .collect();
        // Read before the runtime built them (a program just started): read again next time.
        if precise {
            self.globals = Some(Arc::clone(&roots));
        }
        roots
    }

    /// Lock waiters (indices into this scan's judged) not admitted yet: a lock's waiters are
    /// judged once the analyses have had their say, proven leaked (nothing live can unlock
    /// it) or found live by two in a row (stuck), so a lock left held by a leaked goroutine
    /// fires as a leak, not first as stuck. At most [`HOLD_SCANS`] scans per park, and only
    /// while analyses can run.
    fn hold_lock_waits(
        &mut self,
        candidates: &[Candidate],
        proven: &HashSet<u64>,
    ) -> HashSet<usize> {
        let mut held = HashSet::new();
        if self.binary.mheap.is_none() {
            return held;
        }
        for c in candidates {
            if !matches!(c.class, WaitClass::Lock(_)) || proven.contains(&c.rec.goid) {
                continue;
            }
            let waits = self.waits_of(c.rec.goid);
            if self.settled(c.rec.goid, waits.as_ref()) {
                continue;
            }
            if let Some(r) = self.resolved.get_mut(&c.rec.goid)
                && r.held < HOLD_SCANS
            {
                r.held += 1;
                held.insert(c.index);
            }
        }
        held
    }

    /// Whether a goroutine that started at `startpc` is one of the runtime's own.
    fn is_system(&mut self, startpc: u64) -> bool {
        if let Some(known) = self.system.get(&startpc) {
            return *known;
        }
        let name = self.binary.func_name(startpc.wrapping_sub(self.bias));
        let system = name.is_some_and(|n| super::GO.is_runtime_task(n));
        self.system.insert(startpc, system);
        system
    }

    /// What goroutine `goid` waits on, once read (cached with its sites, per park).
    fn waits_of(&self, goid: u64) -> Option<Arc<[WaitObject]>> {
        self.resolved.get(&goid).and_then(|r| r.waits.clone())
    }

    /// Whether the last two analyses found goroutine `goid`, waiting on `waits`, the same way
    /// (both leaked, or both live).
    fn settled(&self, goid: u64, waits: Option<&Arc<[WaitObject]>>) -> bool {
        let [older, last] = &self.analysed;
        match (waits, older.get(&goid), last.get(&goid)) {
            (Some(w), Some((w1, v1)), Some((w2, v2))) => w1 == w && w2 == w && v1 == v2,
            _ => false,
        }
    }

    /// Turns the probes' record of one goroutine into an observation worth judging, or `None`
    /// when it is not (too young, not running long) or no longer true (then `stale` is set:
    /// drop the record).
    fn observe(
        &mut self,
        goid: u64,
        state: &TaskRecord,
        due: &Due,
        stale: &mut bool,
    ) -> Option<Observation> {
        let parked = state.phase == GoPhase::Parked as u8;
        // A running record is read once it is old enough to be a loop, even one run only
        // once: reading it is how a record whose goroutine has gone is found stale.
        let is_due = if parked {
            due.parked(state.since_ns)
        } else {
            due.running(&super::GO, state.since_ns, state.runs.max(2))
                .is_some()
        };
        if !is_due {
            return None;
        }
        let Some(rec) = task::read_g(&self.mem, state.g, &self.binary.offsets) else {
            *stale = !self.is_alive();
            return None;
        };
        // Exited (the g is dead or reused), or parked records whose goroutine has woken since
        // (wake-ups are not probed): drop them; the next park or preemption records it anew.
        if rec.goid != goid
            || rec.status == task::G_DEAD
            || (parked && rec.status != task::G_WAITING)
        {
            *stale = true;
            return None;
        }
        if parked {
            return Some(self.judge(
                &rec,
                Seen::Parked {
                    since_ns: state.since_ns,
                    reason: state.reason,
                },
            ));
        }
        // Runnable or running, rescheduled at least once without parking, and no transition
        // out of running since the last preemption (else it parked or made a system call).
        let same_run = rec.tracking_seq == state.seq.wrapping_add(1);
        (matches!(rec.status, task::G_RUNNABLE | task::G_RUNNING) && state.runs >= 2 && same_run)
            .then(|| {
                self.judge(
                    &rec,
                    Seen::Running {
                        since_ns: state.since_ns,
                        runs: state.runs,
                        last_run_ns: state.last_run_ns,
                    },
                )
            })
    }

    fn judge(&mut self, rec: &GRecord, seen: Seen) -> Observation {
        let (since_ns, parked) = match seen {
            Seen::Parked { since_ns, .. } => (since_ns, true),
            Seen::Running { since_ns, .. } => (since_ns, false),
        };
        let resolved = match self.resolved.get(&rec.goid) {
            Some(r) if r.since_ns == since_ns => r.clone(),
            _ => {
                let r = self.resolve(rec, since_ns, parked);
                self.resolved.insert(rec.goid, r.clone());
                r
            }
        };
        let state = match seen {
            Seen::Parked { since_ns, reason } => TaskState::Parked {
                since_ns,
                wait_reason: self.interned.name(self.binary.wait_reason(reason)),
                blocked_at: resolved.blocked_at,
            },
            Seen::Running {
                since_ns,
                runs,
                last_run_ns,
            } => TaskState::Running {
                since_ns,
                runs,
                last_run_ns,
            },
        };
        Observation {
            id: rec.goid,
            state,
            created_at: resolved.created_at,
            entry: resolved.entry,
            waits_on: None,
            proven: false,
            stack: resolved.stack,
            thread: None,
        }
    }

    /// Forgets cached sites of goroutines neither the probes nor the last scan list.
    fn retain_resolved(&mut self, live: impl Fn(u64) -> bool) {
        let parks = &self.parks;
        self.resolved
            .retain(|goid, _| live(*goid) || parks.contains_key(goid));
    }

    fn resolve(&mut self, rec: &GRecord, since_ns: u64, parked: bool) -> Resolved {
        let created_at = self.creation_site(rec.gopc);
        let entry = self.entry(rec.startpc);
        // A running goroutine's saved registers are stale (its stack moved on): no stack.
        let (blocked_at, stack) = if parked {
            let frames = self.frames_at(task::stack(&self.mem, rec));
            let sites = frames.iter().map(site_of).collect();
            (self.pick_site(&frames), Some(self.interned.stack(sites)))
        } else {
            (None, None)
        };
        Resolved {
            since_ns,
            created_at,
            entry,
            blocked_at: blocked_at.map(|s| self.interned.site(s)),
            stack,
            waits: None,
            held: 0,
        }
    }

    /// Where the `go` statement at `gopc` is, as alerts name it (cached: a leak's goroutines
    /// share one).
    fn creation_site(&mut self, gopc: u64) -> Option<Arc<Site>> {
        if let Some(site) = self.creation_sites.get(&gopc) {
            return site.clone();
        }
        let site = self
            .pick_site(&self.frames_at([gopc]))
            .map(|s| self.interned.site(s));
        self.creation_sites.insert(gopc, site.clone());
        site
    }

    /// The function a goroutine that started at `startpc` runs (the function a `go`
    /// statement named, not the compiler's wrapper around it).
    fn entry(&mut self, startpc: u64) -> Arc<str> {
        if let Some(e) = self.entries.get(&startpc) {
            return Arc::clone(e);
        }
        let pc = startpc.wrapping_sub(self.bias);
        let name = self.binary.func_name(pc).unwrap_or("?");
        // Since go1.22 `go f(x)` starts a compiler wrapper `caller.gowrapN`; name f.
        let callee = name
            .contains(".gowrap")
            .then(|| self.binary.wrapped_call(pc))
            .flatten();
        let e = self.interned.name(callee.as_deref().unwrap_or(name));
        self.entries.insert(startpc, Arc::clone(&e));
        e
    }

    /// Frames of return addresses `pcs` (innermost first, inlined calls expanded).
    fn frames_at(&self, pcs: impl IntoIterator<Item = u64>) -> Vec<Frame> {
        pcs.into_iter()
            // A return address points after the call; the call is the instruction before.
            .flat_map(|pc| {
                self.binary
                    .frames(pc.wrapping_sub(self.bias).wrapping_sub(1))
            })
            .collect()
    }
}

fn site_of(f: &Frame) -> Site {
    Site {
        function: f.function.clone(),
        file: f.file.clone(),
        line: f.line,
    }
}

impl Target {
    /// The first frame in the program's own module, else in a dependency, else outside the
    /// runtime.
    fn pick_site(&self, frames: &[Frame]) -> Option<Site> {
        pick_frame(frames, |f| &f.function, self.binary.main_module.as_deref()).map(site_of)
    }
}
