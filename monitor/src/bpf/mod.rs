//! Loading leakmon's kernel programs, attaching them to processes, and reading what they keep.

mod btf;
mod sampler;
mod threads;

pub(crate) use btf::member_offset;
pub(crate) use sampler::{Regs, Sampler};
pub(crate) use threads::ThreadTables;

use std::{
    collections::{HashMap, HashSet},
    io,
    num::NonZeroU32,
    path::{Path, PathBuf},
};

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        BtfTracePoint, UProbe,
        uprobe::{UProbeLinkId, UProbeScope},
    },
};
use monitor_ebpf::{
    DEFAULT_GO_QUOTA, FutexWait, GoKey, GoProc, MAX_GOROUTINES, MAX_THREADS, ThreadState, names,
    stat,
};

use crate::sys::caps;

/// What the runtime probes keep of one task: its phase (parked or running) and since when,
/// what it waits for, how often it ran. Go's uprobes (park, preemption, exit) are the ones that
/// write it today, and the kernel type is named after them.
pub(crate) type TaskRecord = monitor_ebpf::GoState;
/// One process's task records, by task id.
pub(crate) type TaskRecords = HashMap<u64, TaskRecord>;

/// The kernel programs, built by build.rs for the BPF target.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/leakmon"));

#[derive(Debug, thiserror::Error)]
pub(crate) enum BpfError {
    #[error(
        "missing privileges to load eBPF programs ({missing}): run as root, or grant \
         CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH, and CAP_SYS_ADMIN in a \
         container (default seccomp profiles allow bpf() only with it) (`leakmon doctor` checks)"
    )]
    Privileges { missing: String },
    #[error("loading leakmon's eBPF object failed (`leakmon doctor` checks the kernel)")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("the eBPF object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("the kernel rejected eBPF program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error(
        "reading kernel BTF (/sys/kernel/btf/vmlinux) failed: the kernel needs CONFIG_DEBUG_INFO_BTF"
    )]
    Btf(#[source] Box<aya::BtfError>),
    #[error("attaching {probe} to PID {pid} ({exe}) failed")]
    Attach {
        probe: &'static str,
        pid: u32,
        exe: PathBuf,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("eBPF map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
}

/// One uprobe to attach: the program (a `names::GO_*`) and the file offset in the executable.
pub(crate) type Uprobe = (&'static str, u64);

/// The attachments made for one process; detached by [`Probes::detach`] (or when `Probes`
/// is dropped).
#[derive(Debug)]
pub(crate) struct Links {
    pid: u32,
    links: Vec<(&'static str, UProbeLinkId)>,
}

/// How large the kernel maps are, and each process's share of the task map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Capacity {
    pub tasks: u32,
    pub threads: u32,
    pub task_quota: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        Self {
            tasks: MAX_GOROUTINES,
            threads: MAX_THREADS,
            task_quota: DEFAULT_GO_QUOTA,
        }
    }
}

/// Totals of the per-CPU counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Stats {
    pub parks: u64,
    pub preempts: u64,
    pub exits: u64,
    pub map_full: u64,
    pub read_errors: u64,
    pub proc_events_lost: u64,
    pub thread_waits_full: u64,
    pub threads_full: u64,
    pub quota_full: u64,
}

pub(crate) struct Probes {
    ebpf: Ebpf,
    procs: BpfHashMap<MapData, u32, GoProc>,
    tasks: BpfHashMap<MapData, GoKey, TaskRecord>,
    stats: PerCpuArray<MapData, u64>,
    /// Set once the thread probes are attached ([`Probes::attach_threads`]).
    threads: Option<ThreadMaps>,
    task_quota: u32,
    /// Whether the kernel's BTF gave `task_struct`'s pid offset (thread creation is traced).
    fork_offset: bool,
    sampler: std::sync::Arc<Sampler>,
}

struct ThreadMaps {
    waits: BpfHashMap<MapData, u32, FutexWait>,
    states: BpfHashMap<MapData, u32, ThreadState>,
}

const GO_PROGRAMS: [&str; 3] = [names::GO_PARK, names::GO_PREEMPT, names::GO_EXIT];

impl Probes {
    /// Loads the programs into the kernel (nothing is attached yet).
    pub(crate) fn load(capacity: Capacity) -> Result<Self, BpfError> {
        let missing = caps::missing(&[caps::CAP_BPF, caps::CAP_PERFMON]);
        if !missing.is_empty() {
            return Err(BpfError::Privileges {
                missing: missing.join(", "),
            });
        }
        raise_memlock_limit();
        let pid_offset = btf::task_pid_offset();
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(names::GOROUTINES, capacity.tasks)
            .map_max_entries(names::THREADS, capacity.threads)
            .override_global(names::TASK_PID_OFFSET, &pid_offset.unwrap_or(0), true)
            .load(OBJECT)
            .map_err(|e| BpfError::Load(Box::new(e)))?;
        for name in GO_PROGRAMS {
            let program: &mut UProbe = program(&mut ebpf, name)?;
            program.load().map_err(|source| BpfError::Program {
                name,
                source: Box::new(source),
            })?;
        }
        let procs = BpfHashMap::try_from(take_map(&mut ebpf, names::GO_PROCS)?)
            .map_err(map_err(names::GO_PROCS))?;
        let tasks = BpfHashMap::try_from(take_map(&mut ebpf, names::GOROUTINES)?)
            .map_err(map_err(names::GOROUTINES))?;
        let stats = PerCpuArray::try_from(take_map(&mut ebpf, names::STATS)?)
            .map_err(map_err(names::STATS))?;
        let sampler = Self::load_sampler(&mut ebpf)?;
        Ok(Self {
            ebpf,
            procs,
            tasks,
            stats,
            threads: None,
            task_quota: capacity.task_quota,
            fork_offset: pid_offset.is_some(),
            sampler,
        })
    }

    /// Starts tracing the tasks of `pid` (where the probes find their ids: `proc`) with
    /// `probes`.
    pub(crate) fn attach_uprobes(
        &mut self,
        pid: NonZeroU32,
        proc: GoProc,
        probes: &[Uprobe],
    ) -> Result<Links, BpfError> {
        let raw = pid.get();
        let proc = GoProc {
            records: 0,
            quota: u64::from(self.task_quota),
            ..proc
        };
        self.procs
            .insert(&raw, &proc, 0)
            .map_err(map_err(names::GO_PROCS))?;
        // Through /proc: the kernel resolves the inode even across mount namespaces.
        let exe = PathBuf::from(format!("/proc/{raw}/exe"));
        let mut links = Links {
            pid: raw,
            links: Vec::new(),
        };
        for &(name, offset) in probes {
            match self.attach_one(name, offset, &exe, pid) {
                Ok(link) => links.links.push((name, link)),
                Err(source) => {
                    self.detach(links);
                    return Err(BpfError::Attach {
                        probe: name,
                        pid: raw,
                        exe: std::fs::read_link(&exe).unwrap_or(exe),
                        source: Box::new(source),
                    });
                }
            }
        }
        Ok(links)
    }

    fn attach_one(
        &mut self,
        name: &'static str,
        offset: u64,
        exe: &Path,
        pid: NonZeroU32,
    ) -> Result<UProbeLinkId, aya::programs::ProgramError> {
        let program: &mut UProbe = self
            .ebpf
            .program_mut(name)
            .ok_or(aya::programs::ProgramError::NotLoaded)?
            .try_into()?;
        program.attach([offset], exe, UProbeScope::OneProcess(pid))
    }

    /// Stops tracing a process and forgets its tasks.
    pub(crate) fn detach(&mut self, links: Links) {
        for (name, link) in links.links {
            if let Some(Ok(program)) = self.ebpf.program_mut(name).map(<&mut UProbe>::try_from)
                && let Err(e) = program.detach(link)
            {
                log::warn!("detaching {name} from PID {}: {e}", links.pid);
            }
        }
        let _ = self.procs.remove(&links.pid);
        // Its tasks' records go at the next scan (`forget_processes`), in one walk.
    }

    /// Drops every task record of the processes in `pids` from the map, in one walk.
    pub(crate) fn forget_processes(&mut self, pids: &HashSet<u32>) {
        if pids.is_empty() {
            return;
        }
        let keys: Vec<GoKey> = self
            .tasks
            .keys()
            .filter_map(Result::ok)
            .filter(|k| pids.contains(&k.tgid))
            .collect();
        for key in keys {
            let _ = self.tasks.remove(&key);
        }
    }

    /// Every task the probes know of, grouped by process. Each watched process's record
    /// count (what its quota is checked against) is set to what the walk found: the probes
    /// count up, removals from here do not count down.
    pub(crate) fn task_records(&mut self) -> HashMap<u32, TaskRecords> {
        let mut by_pid: HashMap<u32, TaskRecords> = HashMap::new();
        // Entries removed while iterating come back as errors: skip them. A deletion under
        // the cursor restarts the walk from the first key, so keying by goid drops the
        // repeats.
        for (key, state) in self.tasks.iter().filter_map(Result::ok) {
            by_pid.entry(key.tgid).or_default().insert(key.goid, state);
        }
        let procs: Vec<(u32, GoProc)> = self.procs.iter().filter_map(Result::ok).collect();
        for (pid, mut proc) in procs {
            let records = by_pid.get(&pid).map_or(0, |g| g.len() as u64);
            if proc.records != records {
                proc.records = records;
                // BPF_EXIST: a process detached meanwhile stays detached.
                let _ = self.procs.insert(&pid, &proc, 2);
            }
        }
        by_pid
    }

    /// Drops a task's record if it is still the one `seen` (a probe may have written a newer
    /// one since the scan read it).
    pub(crate) fn forget_record(&mut self, pid: u32, id: u64, seen: &TaskRecord) {
        let key = GoKey {
            tgid: pid,
            _pad: 0,
            goid: id,
        };
        if let Ok(now) = self.tasks.get(&key, 0)
            && now.since_ns == seen.since_ns
            && now.phase == seen.phase
        {
            let _ = self.tasks.remove(&key);
        }
    }

    pub(crate) fn stats(&self) -> Stats {
        let total = |index: u32| -> u64 {
            self.stats
                .get(&index, 0)
                .map(|values| values.iter().sum())
                .unwrap_or(0)
        };
        Stats {
            parks: total(stat::PARKS),
            preempts: total(stat::PREEMPTS),
            exits: total(stat::EXITS),
            map_full: total(stat::MAP_FULL),
            read_errors: total(stat::READ_ERRORS),
            proc_events_lost: total(stat::PROC_EVENTS_LOST),
            thread_waits_full: total(stat::THREAD_WAITS_FULL),
            threads_full: total(stat::THREADS_FULL),
            quota_full: total(stat::GO_QUOTA_FULL),
        }
    }

    /// Attaches the exec tracepoint and returns the ring buffer it fills.
    pub(crate) fn proc_events(&mut self) -> Result<RingBuf<MapData>, BpfError> {
        let btf = Btf::from_sys_fs().map_err(|e| BpfError::Btf(Box::new(e)))?;
        let name = names::PROC_EXEC;
        let program: &mut BtfTracePoint = program(&mut self.ebpf, name)?;
        program
            .load("sched_process_exec", &btf)
            .and_then(|()| program.attach().map(drop))
            .map_err(|source| BpfError::Program {
                name,
                source: Box::new(source),
            })?;
        RingBuf::try_from(take_map(&mut self.ebpf, names::PROC_EVENTS)?)
            .map_err(map_err(names::PROC_EVENTS))
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, BpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(BpfError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(|source| BpfError::Program {
            name,
            source: Box::new(source),
        })
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, BpfError> {
    ebpf.take_map(name)
        .ok_or(BpfError::Missing { kind: "map", name })
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> BpfError {
    move |source| BpfError::Map {
        map,
        source: Box::new(source),
    }
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; newer ones ignore it.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: valid rlimit pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        log::debug!("raising RLIMIT_MEMLOCK: {}", io::Error::last_os_error());
    }
}
