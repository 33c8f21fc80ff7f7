//! One watched Go process: its binary, its memory, its probes, and what was learnt about its
//! goroutines (cached: a goroutine parked at one place stays there until it parks again).

use std::{
    collections::{HashMap, HashSet},
    num::NonZeroU32,
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use monitor_ebpf::{GoPhase, GoProc, GoState, names};

use crate::{
    bpf::{BpfError, GoLinks, Probes},
    detect::{Observation, Site, TaskState},
    go::{
        self, Frame, GoBinary, GoError,
        task::{self, GRecord, is_user_function},
    },
    proc::{self, Container, ProcError, ProcMem},
    sys::workers::Gate,
};

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error(transparent)]
    Proc(#[from] ProcError),
    #[error("PID {pid} ({exe}): {source}")]
    Go {
        pid: u32,
        exe: PathBuf,
        #[source]
        source: GoError,
    },
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error("PID {pid}: another executable is being inspected; tried again at the next scan")]
    Busy { pid: u32 },
}

/// Identity of an executable file (device, inode, mtime), not its path: a redeploy replaces
/// the file under the same path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BinaryKey {
    dev: u64,
    ino: u64,
    mtime: i64,
}

impl BinaryKey {
    /// The executable `pid` runs now.
    pub fn of(pid: u32) -> Result<Self, ProcError> {
        let m = std::fs::metadata(format!("/proc/{pid}/exe"))
            .map_err(|source| proc::exe_error(pid, source))?;
        Ok(Self {
            dev: m.dev(),
            ino: m.ino(),
            mtime: m.mtime(),
        })
    }
}

/// Inspected executables, shared by the processes that run them, and the ones found not to be
/// Go (so a host's other programs are looked at once, not at every exec). Shared with the
/// workers that inspect processes; the lock is held for lookups only, never while reading.
#[derive(Clone)]
pub struct Binaries {
    inner: Arc<Mutex<BinaryCache>>,
    /// One inspection at a time: each reads the pclntab and DWARF whole.
    gate: Arc<Gate>,
    /// Go versions newer than the last validated one are accepted.
    unvalidated: bool,
}

/// How long an inspection waits for another; when one is taken to be stuck.
const INSPECT_WAIT: Duration = Duration::from_secs(2);
const INSPECT_STUCK: Duration = Duration::from_secs(5);

#[derive(Default)]
struct BinaryCache {
    go: HashMap<BinaryKey, Arc<GoBinary>>,
    not_go: HashSet<BinaryKey>,
}

/// Executables remembered as not Go, at most (then the set starts again).
const MAX_NOT_GO: usize = 16_384;

impl Binaries {
    pub fn new(unvalidated: bool) -> Self {
        Self {
            inner: Arc::default(),
            gate: Arc::new(Gate::new(INSPECT_STUCK, 4)),
            unvalidated,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BinaryCache> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The inspected executable `pid` runs; Ok(None) when another inspection kept it waiting.
    fn open(&self, pid: u32, key: BinaryKey) -> Result<Option<Arc<GoBinary>>, GoError> {
        let cached = || {
            let cache = self.lock();
            if let Some(b) = cache.go.get(&key) {
                return Some(Ok(Some(Arc::clone(b))));
            }
            cache.not_go.contains(&key).then_some(Err(GoError::NotGo))
        };
        if let Some(known) = cached() {
            return known;
        }
        let Some(_entered) = self.gate.enter(INSPECT_WAIT) else {
            return Ok(None);
        };
        if let Some(known) = cached() {
            return known;
        }
        // Read through /proc so a binary in another mount namespace is found.
        match GoBinary::open_with(&PathBuf::from(format!("/proc/{pid}/exe")), self.unvalidated) {
            Ok(b) => {
                let b = Arc::new(b);
                self.lock().go.insert(key, Arc::clone(&b));
                Ok(Some(b))
            }
            Err(e) => {
                if matches!(e, GoError::NotGo | GoError::NotElf { .. }) {
                    let mut cache = self.lock();
                    if cache.not_go.len() >= MAX_NOT_GO {
                        cache.not_go.clear();
                    }
                    cache.not_go.insert(key);
                }
                Err(e)
            }
        }
    }

    /// Drops binaries no watched process runs any more (their file stays open otherwise).
    pub fn evict_unused(&self) {
        self.lock().go.retain(|_, b| Arc::strong_count(b) > 1);
    }
}

/// What a goroutine's `g` and stack said, keyed by the phase start it was read for.
#[derive(Clone, Debug)]
struct Resolved {
    since_ns: u64,
    created_at: Option<Arc<Site>>,
    entry: Arc<str>,
    blocked_at: Option<Arc<Site>>,
}

/// One shared copy of each site and name (a leak is thousands of goroutines with the same few).
#[derive(Default)]
struct Interner {
    sites: HashSet<Arc<Site>>,
    names: HashSet<Arc<str>>,
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

    fn name(&mut self, name: &str) -> Arc<str> {
        if let Some(n) = self.names.get(name) {
            return Arc::clone(n);
        }
        let n: Arc<str> = Arc::from(name);
        self.names.insert(Arc::clone(&n));
        n
    }
}

pub struct Target {
    pub pid: u32,
    pub start_time: u64,
    pub key: BinaryKey,
    pub exe: PathBuf,
    pub binary: Arc<GoBinary>,
    pub container: Container,
    bias: u64,
    mem: ProcMem,
    /// Where the probes go: (program, file offset), read from the executable at inspection.
    pub probe_sites: Vec<(&'static str, u64)>,
    resolved: HashMap<u64, Resolved>,
    interned: Interner,
    /// Parks seen by the last goroutine-table scan, by goid.
    parks: HashMap<u64, Park>,
    /// Entry function name by start PC (naming a wrapper's callee reads code).
    entries: HashMap<u64, Arc<str>>,
    /// Creation site by `go`-statement PC: a leak's goroutines share one.
    creation_sites: HashMap<u64, Option<Arc<Site>>>,
    /// Address of `runtime.allgs` when parks are found by scanning; `None` when probed.
    scan: Option<u64>,
}

/// Upper bound on goroutines read per scan (allgs includes dead ones awaiting reuse).
const MAX_GS: usize = 4 << 20;
/// Goroutines read per batch of `process_vm_readv` calls.
const READ_CHUNK: usize = 4096;

/// A park seen by scanning, and since when it has looked the same.
struct Park {
    /// (stack depth, wait reason, trackingSeq). Not sched.pc: every park saves the same
    /// return address in gopark. Not sched.sp: the GC moves parked goroutines' stacks.
    signature: (u64, u8, u8),
    since_ns: u64,
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
    pub fn inspect(pid: u32, binaries: &Binaries, probe_parks: bool) -> Result<Self, TargetError> {
        proc::check_exe_not_on_fuse(pid, &proc::files::fuse_mappings(pid))?;
        let exe = proc::exe_path(pid)?;
        let (_, start_time) = proc::stat(pid)?;
        let go_err = |source| TargetError::Go {
            pid,
            exe: exe.clone(),
            source,
        };
        let key = BinaryKey::of(pid)?;
        let binary = binaries
            .open(pid, key)
            .map_err(go_err)?
            .ok_or(TargetError::Busy { pid })?;
        let site = |f| binary.probe_site(f).map_err(go_err).map(|s| s.file_offset);
        // Parks are found by scanning the goroutine table, or (asked for, or the table cannot
        // be found) by probing every park and exit, which costs on the hot path.
        let mut probe_sites = vec![(names::GO_PREEMPT, site(go::GOSCHED_IMPL)?)];
        let scan = (!probe_parks).then_some(binary.allgs).flatten();
        if scan.is_none() {
            probe_sites.push((names::GO_PARK, site(go::GOPARK)?));
            probe_sites.push((names::GO_EXIT, site(go::GOEXIT1)?));
        }
        let bias = if binary.pie {
            proc::load_bias(pid, binary.lowest_vaddr())?
        } else {
            0
        };
        let mem = ProcMem::open(pid)?;
        Ok(Self {
            pid,
            start_time,
            key,
            exe,
            container: proc::container_of(pid),
            binary,
            bias,
            mem,
            probe_sites,
            resolved: HashMap::new(),
            interned: Interner::default(),
            parks: HashMap::new(),
            entries: HashMap::new(),
            creation_sites: HashMap::new(),
            scan,
        })
    }

    /// Whether the process still runs the executable inspected (an exec replaces it).
    /// Also brings up to date which of its memory is mapped from FUSE files (not read).
    pub fn runs_same_program(&mut self) -> bool {
        // Checked for FUSE first: the identity is a stat() of the file, and an exec may have
        // brought in one on a FUSE mount.
        let fuse = proc::files::fuse_mappings(self.pid);
        self.mem.set_fuse_mappings(&fuse);
        proc::check_exe_not_on_fuse(self.pid, &fuse).is_ok()
            && BinaryKey::of(self.pid).ok() == Some(self.key)
    }

    /// Whether the process still runs the program inspected.
    fn is_alive(&mut self) -> bool {
        proc::stat(self.pid).is_ok_and(|(state, start)| state != 'Z' && start == self.start_time)
            && self.runs_same_program()
    }

    /// Attaches the probes found by [`Target::inspect`].
    pub fn attach(&self, probes: &mut Probes) -> Result<GoLinks, TargetError> {
        let nz = NonZeroU32::new(self.pid).ok_or(ProcError::NoSuchProcess { pid: self.pid })?;
        let params = GoProc {
            goid_offset: self.binary.offsets.goid,
            tracking_seq_offset: self.binary.offsets.tracking_seq,
            ..GoProc::default()
        };
        let links = probes.attach_go(nz, params, &self.probe_sites)?;
        log::info!(
            "watching PID {} ({}, {}, offsets from {:?}, parks seen by {})",
            self.pid,
            self.exe.display(),
            self.binary.version,
            self.binary.offset_source,
            if self.scan.is_some() {
                "scanning runtime.allgs"
            } else {
                "gopark probe"
            },
        );
        Ok(links)
    }

    /// One scan of this process, on a worker: parked goroutines from its table, and the probes'
    /// records (`entries`) read and judged. Returns what to judge and the records found stale.
    pub fn scan(
        &mut self,
        entries: &HashMap<u64, GoState>,
        now_ns: u64,
        block_ns: u64,
        spin_ns: u64,
    ) -> (Vec<Observation>, Vec<(u64, GoState)>) {
        let mut goroutines = self.scan_parked(now_ns, block_ns);
        let mut stale = Vec::new();
        for (goid, state) in entries {
            let mut is_stale = false;
            if let Some(o) = self.observe(*goid, state, now_ns, block_ns, spin_ns, &mut is_stale) {
                goroutines.push(o);
            } else if is_stale {
                stale.push((*goid, *state));
            }
        }
        self.retain_resolved(|g| entries.contains_key(&g));
        (goroutines, stale)
    }

    /// Parked goroutines from the goroutine table (`runtime.allgs`), for binaries whose symbol
    /// table or code gives its address. A goroutine counts as parked since the first scan that
    /// saw it parked with the same stack depth, wait reason and `trackingSeq` (which moves on
    /// every park and wake), so a worker re-parking at the same place between scans is a new
    /// park. Those parked at least `min_parked_ns` are returned for judging.
    fn scan_parked(&mut self, now_ns: u64, min_parked_ns: u64) -> Vec<Observation> {
        let Some(allgs) = self.scan else {
            return Vec::new();
        };
        let previous = std::mem::take(&mut self.parks);
        let mut judged = Vec::new();
        let gs = task::all_gs(&self.mem, allgs.wrapping_add(self.bias), MAX_GS);
        // In chunks: one buffer for a whole table of 100k goroutines would be ~30 MiB.
        for chunk in gs.chunks(READ_CHUNK) {
            let records = task::read_gs(&self.mem, chunk, &self.binary.offsets);
            for rec in records.into_iter().flatten() {
                if rec.status != task::G_WAITING {
                    continue;
                }
                let signature = (rec.stack_depth, rec.waitreason, rec.tracking_seq);
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
                if now_ns.saturating_sub(since_ns) >= min_parked_ns {
                    judged.push(self.judge(
                        &rec,
                        Seen::Parked {
                            since_ns,
                            reason: rec.waitreason,
                        },
                    ));
                }
            }
        }
        judged
    }

    /// Turns the probes' record of one goroutine into an observation worth judging, or `None`
    /// when it is not (too young, not running long) or no longer true (then `stale` is set:
    /// drop the record).
    fn observe(
        &mut self,
        goid: u64,
        state: &GoState,
        now_ns: u64,
        min_parked_ns: u64,
        min_running_ns: u64,
        stale: &mut bool,
    ) -> Option<Observation> {
        let age = now_ns.saturating_sub(state.since_ns);
        let parked = state.phase == GoPhase::Parked as u8;
        if age
            < if parked {
                min_parked_ns
            } else {
                min_running_ns
            }
        {
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
        (matches!(rec.status, 1 | 2) && state.runs >= 2 && same_run).then(|| {
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
            goid: rec.goid,
            state,
            created_at: resolved.created_at,
            entry: resolved.entry,
        }
    }

    /// Forgets cached sites of goroutines neither the probes nor the last scan list.
    fn retain_resolved(&mut self, live: impl Fn(u64) -> bool) {
        let parks = &self.parks;
        self.resolved
            .retain(|goid, _| live(*goid) || parks.contains_key(goid));
    }

    fn resolve(&mut self, rec: &GRecord, since_ns: u64, parked: bool) -> Resolved {
        let created_at = match self.creation_sites.get(&rec.gopc) {
            Some(site) => site.clone(),
            None => {
                let site = pick_site(&self.frames_at([rec.gopc])).map(|s| self.interned.site(s));
                self.creation_sites.insert(rec.gopc, site.clone());
                site
            }
        };
        let entry = match self.entries.get(&rec.startpc) {
            Some(e) => Arc::clone(e),
            None => {
                let pc = rec.startpc.wrapping_sub(self.bias);
                let name = self.binary.func_name(pc).unwrap_or("?");
                // Since go1.22 `go f(x)` starts a compiler wrapper `caller.gowrapN`; name f.
                let callee = name
                    .contains(".gowrap")
                    .then(|| self.binary.wrapped_call(pc))
                    .flatten();
                let e = self.interned.name(callee.as_deref().unwrap_or(name));
                self.entries.insert(rec.startpc, Arc::clone(&e));
                e
            }
        };
        // A running goroutine's saved registers are stale (its stack moved on): no stack.
        let blocked_at = if parked {
            pick_site(&self.frames_at(task::stack(&self.mem, rec)))
        } else {
            None
        };
        Resolved {
            since_ns,
            created_at,
            entry,
            blocked_at: blocked_at.map(|s| self.interned.site(s)),
        }
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

/// The first frame in the program's own code, else the first frame outside the runtime.
fn pick_site(frames: &[Frame]) -> Option<Site> {
    frames
        .iter()
        .find(|f| is_user_function(&f.function))
        .or_else(|| frames.iter().find(|f| !f.function.starts_with("runtime.")))
        .map(|f| Site {
            function: f.function.clone(),
            file: f.file.clone(),
            line: f.line,
        })
}
