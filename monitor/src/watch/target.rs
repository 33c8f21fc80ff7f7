//! One watched Go process: its binary, its memory, its probes, and what was learnt about its
//! goroutines (cached: a goroutine parked at one place stays there until it parks again).

use std::{
    collections::{HashMap, HashSet},
    num::NonZeroU32,
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::Arc,
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
}

/// Identity of an executable file, for the cache of inspected binaries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BinaryKey {
    dev: u64,
    ino: u64,
    mtime: i64,
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
    start_time: u64,
    pub exe: PathBuf,
    pub binary: Arc<GoBinary>,
    pub container: Container,
    bias: u64,
    mem: ProcMem,
    links: Option<GoLinks>,
    resolved: HashMap<u64, Resolved>,
    interned: Interner,
    /// Parks seen by the last goroutine-table scan, by goid.
    parks: HashMap<u64, Park>,
}

/// Upper bound on goroutines read per scan (allgs includes dead ones awaiting reuse).
const MAX_GS: usize = 4 << 20;

/// A park seen by scanning, and since when it has looked the same.
struct Park {
    signature: (u64, u64, u8, u8),
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
    /// Inspects `pid`'s executable and attaches the probes.
    pub fn attach(
        pid: u32,
        probes: &mut Probes,
        binaries: &mut HashMap<BinaryKey, Arc<GoBinary>>,
    ) -> Result<Self, TargetError> {
        let nz = NonZeroU32::new(pid).ok_or(ProcError::NoSuchProcess { pid })?;
        let exe = proc::exe_path(pid)?;
        let (_, start_time) = proc::stat(pid)?;
        let go_err = |source| TargetError::Go {
            pid,
            exe: exe.clone(),
            source,
        };
        // The same file (device, inode, mtime), not the same path: a redeploy replaces it.
        let key = std::fs::metadata(format!("/proc/{pid}/exe"))
            .map(|m| BinaryKey {
                dev: m.dev(),
                ino: m.ino(),
                mtime: m.mtime(),
            })
            .map_err(|e| ProcError::Access {
                pid,
                what: "exe",
                source: e,
            })?;
        let binary = match binaries.get(&key) {
            Some(b) => Arc::clone(b),
            None => {
                // Read through /proc so a binary in another mount namespace is found.
                let b = Arc::new(
                    GoBinary::open(&PathBuf::from(format!("/proc/{pid}/exe"))).map_err(go_err)?,
                );
                binaries.insert(key, Arc::clone(&b));
                b
            }
        };
        let site = |f| binary.probe_site(f).map_err(go_err).map(|s| s.file_offset);
        // Parks are found by scanning the goroutine table when its address is known; else
        // (stripped binaries) by probing every park and exit, which costs on the hot path.
        let mut go_probes = vec![(names::GO_PREEMPT, site(go::GOSCHED_IMPL)?)];
        if binary.allgs.is_none() {
            go_probes.push((names::GO_PARK, site(go::GOPARK)?));
            go_probes.push((names::GO_EXIT, site(go::GOEXIT1)?));
        }
        let bias = if binary.pie {
            proc::load_bias(pid, binary.lowest_vaddr())?
        } else {
            0
        };
        let mem = ProcMem::open(pid)?;
        let proc_params = GoProc {
            goid_offset: binary.offsets.goid,
            tracking_seq_offset: binary.offsets.tracking_seq,
        };
        let links = probes.attach_go(nz, proc_params, &go_probes)?;
        let target = Self {
            pid,
            start_time,
            exe,
            container: proc::container_of(pid),
            binary,
            bias,
            mem,
            links: Some(links),
            resolved: HashMap::new(),
            interned: Interner::default(),
            parks: HashMap::new(),
        };
        log::info!(
            "watching PID {pid} ({}, {}, offsets from {:?}, parks seen by {})",
            target.exe.display(),
            target.binary.version,
            target.binary.offset_source,
            if target.binary.allgs.is_some() {
                "scanning runtime.allgs"
            } else {
                "gopark probe (stripped binary)"
            },
        );
        Ok(target)
    }

    /// Whether the process still runs (the same one: PIDs are reused).
    pub fn is_alive(&self) -> bool {
        proc::stat(self.pid).is_ok_and(|(state, start)| state != 'Z' && start == self.start_time)
    }

    pub fn detach(&mut self, probes: &mut Probes) {
        if let Some(links) = self.links.take() {
            probes.detach_go(links);
        }
    }

    /// Parked goroutines from the goroutine table (`runtime.allgs`), for binaries whose symbol
    /// table gives its address. A goroutine counts as parked since the first scan that saw it
    /// parked with the same stack pointer, PC, wait reason and `trackingSeq` (which moves on
    /// every park and wake), so a worker re-parking at the same place between scans is a new
    /// park. Those parked at least `min_parked_ns` are returned for judging.
    pub fn scan_parked(&mut self, now_ns: u64, min_parked_ns: u64) -> Vec<Observation> {
        let Some(allgs) = self.binary.allgs else {
            return Vec::new();
        };
        let previous = std::mem::take(&mut self.parks);
        let mut judged = Vec::new();
        for g in task::all_gs(&self.mem, allgs.wrapping_add(self.bias), MAX_GS) {
            let Some(rec) = task::read_g(&self.mem, g, &self.binary.offsets) else {
                continue;
            };
            if rec.status != task::G_WAITING {
                continue;
            }
            let signature = (rec.sched_sp, rec.sched_pc, rec.waitreason, rec.tracking_seq);
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
        judged
    }

    /// Turns the probes' record of one goroutine into an observation worth judging, or `None`
    /// when it is not (too young, not running long) or no longer true (then `stale` is set:
    /// drop the record).
    pub fn observe(
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
        // Runnable or running, and rescheduled at least once without parking.
        (matches!(rec.status, 1 | 2) && state.runs >= 2).then(|| {
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
    pub fn retain_resolved(&mut self, live: impl Fn(u64) -> bool) {
        let parks = &self.parks;
        self.resolved
            .retain(|goid, _| live(*goid) || parks.contains_key(goid));
    }

    fn resolve(&mut self, rec: &GRecord, since_ns: u64, parked: bool) -> Resolved {
        let created_at = pick_site(&self.frames_at([rec.gopc]));
        let mut entry = self
            .binary
            .func_name(rec.startpc.wrapping_sub(self.bias))
            .unwrap_or("?");
        // Since go1.22 `go f(x)` starts a compiler wrapper `caller.gowrapN`; name f.
        if entry.contains(".gowrap")
            && let Some(callee) = self
                .binary
                .wrapped_call(rec.startpc.wrapping_sub(self.bias))
        {
            entry = callee;
        }
        let entry = self.interned.name(entry);
        // A running goroutine's saved registers are stale (its stack moved on): no stack.
        let blocked_at = if parked {
            pick_site(&self.frames_at(task::stack(&self.mem, rec)))
        } else {
            None
        };
        Resolved {
            since_ns,
            created_at: created_at.map(|s| self.interned.site(s)),
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
