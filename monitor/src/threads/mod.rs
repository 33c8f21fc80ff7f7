//! OS threads of any process: what the thread probes recorded, completed from /proc (names,
//! states, stacks of long waits, lock owners), as per-process snapshots for
//! [`crate::detect::ThreadDetector`]. Snapshots read what the target controls and run on
//! workers; the probes' maps are read and written by the loop only.

pub(crate) mod futex;
pub(crate) mod stack;
pub(crate) mod symbols;

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use monitor_ebpf::{FutexWait, ThreadState};

use self::{
    futex::{LockFlavor, PTHREAD_MUTEX_OWNER_OFFSET, WaitKind},
    stack::StackReader,
    symbols::{Frame, Symbolizer},
};
use crate::{
    bpf::ThreadTables,
    detect::{FutexObs, Site, ThreadObs, ThreadSnapshot},
    proc::ProcMem,
    runtime::{Census, CountMetric},
};

/// Every process's thread count, OpenTelemetry's `process.thread.count`, by state.
pub(crate) static THREAD_COUNT: CountMetric = CountMetric {
    name: "process.thread.count",
    unit: "{thread}",
    description: "Threads of the process at leakmon's last scan, by state: running (on a CPU), \
                  waiting (futex: in a futex wait), off_cpu (any other wait)",
};

/// What is kept of a thread's long wait between scans: its stack does not change while the
/// wait lasts. The lock owner is not kept: it is read again at every scan (a mutex passes
/// from one waiter to another while the wait goes on).
#[derive(Clone, Debug)]
struct Seen {
    /// The wait (or off-CPU period) this was computed for.
    since_ns: u64,
    name: Arc<str>,
    blocked_at: Option<Arc<Site>>,
    entry: Option<Arc<str>>,
    stack: Arc<[String]>,
    /// Futex wait judged: kind and flavor.
    futex: Option<(WaitKind, LockFlavor)>,
}

/// What is kept of one process's threads between scans. Moved into the worker that takes the
/// process's snapshot, and back.
#[derive(Default)]
pub(crate) struct ProcessState {
    seen: HashMap<u32, Seen>,
}

/// Records the probes keep that a snapshot found stale: the loop drops them from the maps.
#[derive(Debug, Default)]
pub(crate) struct Stale {
    pub threads: Vec<u32>,
    pub waits: Vec<(u32, FutexWait)>,
}

/// The threads of `pid` as /proc shows them now, for seeding the probes' tables: threads that
/// were already asleep or in a futex wait when leakmon started are otherwise unseen until they
/// next run. Reads the target's /proc files, so it runs on a worker.
pub(crate) fn seed(pid: u32, now_ns: u64) -> Vec<(u32, ThreadState, Option<FutexWait>)> {
    tasks(pid)
        .into_iter()
        .filter_map(|tid| {
            let state = read_small(&format!("/proc/{pid}/task/{tid}/stat"))?;
            if task_state(&state) == Some('R') {
                return None;
            }
            let wait = read_small(&format!("/proc/{pid}/task/{tid}/syscall"))
                .and_then(|line| futex::from_proc_syscall(&line, pid, now_ns));
            let state = ThreadState {
                tgid: pid,
                _pad: 0,
                created_ns: 0,
                off_cpu_since_ns: now_ns,
            };
            Some((tid, state, wait))
        })
        .collect()
}

/// Groups the probes' tables by process, skipping `exclude` (leakmon itself).
pub(crate) fn by_process(tables: ThreadTables, exclude: u32) -> HashMap<u32, ProcessThreads> {
    let mut out: HashMap<u32, ProcessThreads> = HashMap::new();
    for (tid, state) in tables.threads {
        if state.tgid != exclude {
            out.entry(state.tgid)
                .or_default()
                .threads
                .push((tid, state));
        }
    }
    for (tid, wait) in tables.waits {
        if wait.tgid != exclude {
            out.entry(wait.tgid).or_default().waits.insert(tid, wait);
        }
    }
    out
}

/// When a snapshot looks closer at threads: those blocked at least `deep_ns` get a name, a
/// stack and a judged wait; futex waits already after `settle_ns` (so that lock cycles are
/// found early).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Depth {
    pub settle_ns: u64,
    pub deep_ns: u64,
}

impl ProcessState {
    /// One process's snapshot, taken on a worker (it reads the target's /proc files, memory
    /// and mapped files). Returns it with the records found stale.
    pub(crate) fn snapshot(
        &mut self,
        symbolizer: &Symbolizer,
        pid: u32,
        mut process: ProcessThreads,
        now_ns: u64,
        depth: Depth,
    ) -> (ThreadSnapshot, Stale) {
        let mut stale = Stale::default();
        let age = |since: u64| now_ns.saturating_sub(since);
        // Threads known only from a wait (seeded, or the switch record was lost) count too.
        let known: HashSet<u32> = process.threads.iter().map(|(tid, _)| *tid).collect();
        for (tid, wait) in &process.waits {
            if !known.contains(tid) {
                process.threads.push((
                    *tid,
                    ThreadState {
                        tgid: pid,
                        _pad: 0,
                        created_ns: 0,
                        off_cpu_since_ns: wait.since_ns,
                    },
                ));
            }
        }
        let is_deep = |state: &ThreadState, wait: Option<&FutexWait>| {
            age(wait.map_or(state.off_cpu_since_ns, |w| w.since_ns)) >= depth.deep_ns
                || wait.is_some_and(|w| age(w.since_ns) >= depth.settle_ns)
        };
        // Stacks are read only for processes with a long wait.
        let any_deep = process
            .threads
            .iter()
            .any(|(tid, state)| is_deep(state, process.waits.get(tid)));
        let mut reader = if any_deep {
            ProcMem::open(pid)
                .ok()
                .zip(symbolizer.process(pid))
                .map(|(mem, symbols)| StackReader::new(mem, symbols))
        } else {
            None
        };
        let mut ns_tids: Option<HashMap<u32, u32>> = None;
        let mut threads = Vec::with_capacity(process.threads.len());
        let shallow = |tid: u32, off_cpu_since_ns: Option<u64>| ThreadObs {
            tid,
            name: "".into(),
            off_cpu_since_ns,
            wait: None,
            blocked_at: None,
            entry: None,
            stack: Arc::from([]),
        };
        for (tid, state) in &process.threads {
            let wait = process.waits.get(tid);
            if !is_deep(state, wait) {
                threads.push(shallow(*tid, Some(state.off_cpu_since_ns)));
                continue;
            }
            // A long one: confirm from /proc that it still sleeps, in the same wait.
            let Some(stat) = read_small(&format!("/proc/{pid}/task/{tid}/stat")) else {
                stale.threads.push(*tid);
                self.seen.remove(tid);
                continue;
            };
            let syscall =
                read_small(&format!("/proc/{pid}/task/{tid}/syscall")).unwrap_or_default();
            let running = matches!(task_state(&stat), Some('R') | None);
            let wait = wait.filter(|w| {
                let still = futex::from_proc_syscall(&syscall, pid, 0)
                    .is_some_and(|now| now.uaddr == w.uaddr);
                if !still {
                    stale.waits.push((*tid, **w));
                }
                still
            });
            if running && wait.is_none() {
                threads.push(shallow(*tid, None));
                continue;
            }
            let since = wait.map_or(state.off_cpu_since_ns, |w| w.since_ns);
            let seen = match self.seen.get(tid).filter(|s| s.since_ns == since) {
                Some(seen) => seen.clone(),
                None => {
                    let seen = judge(pid, *tid, since, wait, &syscall, reader.as_mut());
                    // Kept while the wait lasts, unless a module was missing: then again.
                    if !reader.as_ref().is_some_and(StackReader::incomplete) {
                        self.seen.insert(*tid, seen.clone());
                    }
                    seen
                }
            };
            let futex = wait.zip(seen.futex).map(|(w, (kind, flavor))| {
                // Read now, at every scan: who holds a lock changes while waiters wait.
                let owner = lock_owner(reader.as_ref(), w, kind, flavor);
                FutexObs {
                    uaddr: w.uaddr,
                    since_ns: w.since_ns,
                    kind,
                    flavor,
                    owner_tid: owner.and_then(|owner| {
                        let map = ns_tids.get_or_insert_with(|| namespace_tids(pid));
                        map.get(&owner).copied()
                    }),
                }
            });
            threads.push(ThreadObs {
                tid: *tid,
                name: seen.name,
                off_cpu_since_ns: (!running).then_some(state.off_cpu_since_ns),
                wait: futex,
                blocked_at: seen.blocked_at,
                entry: seen.entry,
                stack: seen.stack,
            });
        }
        let live: HashSet<u32> = process.threads.iter().map(|(tid, _)| *tid).collect();
        self.seen.retain(|tid, _| live.contains(tid));
        (ThreadSnapshot { now_ns, threads }, stale)
    }
}

/// The owner a lock records (in the process's PID namespace), read from its memory.
fn lock_owner(
    reader: Option<&StackReader>,
    wait: &FutexWait,
    kind: WaitKind,
    flavor: LockFlavor,
) -> Option<u32> {
    let reader = reader?;
    match (kind, flavor) {
        (WaitKind::Lock, LockFlavor::PthreadMutex) => reader
            .read_u32(wait.uaddr + PTHREAD_MUTEX_OWNER_OFFSET)
            .filter(|o| *o != 0),
        (WaitKind::Lock, LockFlavor::PiMutex) => reader
            .read_u32(wait.uaddr)
            .map(futex::pi_owner)
            .filter(|o| *o != 0),
        _ => None,
    }
}

/// A small /proc file of a target (stat, syscall, comm, status lines), bounded.
fn read_small(path: &str) -> Option<String> {
    let bytes = crate::proc::files::read_proc_capped(path, 64 << 10).ok()?;
    String::from_utf8(bytes).ok()
}

/// One process's records from the probes.
#[derive(Debug, Default)]
pub(crate) struct ProcessThreads {
    pub threads: Vec<(u32, ThreadState)>,
    pub waits: HashMap<u32, FutexWait>,
}

impl ProcessThreads {
    /// Its threads counted: on a CPU, in a futex wait, off a CPU for anything else.
    pub(crate) fn count(&self) -> Census {
        let (mut running, mut futex, mut off) = (0, 0, 0);
        for (tid, t) in &self.threads {
            if t.off_cpu_since_ns == 0 {
                running += 1;
            } else if self.waits.contains_key(tid) {
                futex += 1;
            } else {
                off += 1;
            }
        }
        let mut census = Census::new(&THREAD_COUNT);
        let (none, futex_reason): (Arc<str>, Arc<str>) = ("".into(), "futex".into());
        for (state, reason, n) in [
            ("running", &none, running),
            ("waiting", &futex_reason, futex),
            ("off_cpu", &none, off),
        ] {
            if n > 0 {
                census.add_n(state, reason, n);
            }
        }
        census
    }
}

/// Names a long wait: the thread's name and stack, and what the futex is for.
fn judge(
    pid: u32,
    tid: u32,
    since_ns: u64,
    wait: Option<&FutexWait>,
    syscall: &str,
    mut reader: Option<&mut StackReader>,
) -> Seen {
    let name: Arc<str> = read_small(&format!("/proc/{pid}/task/{tid}/comm"))
        .map(|c| c.trim_end().into())
        .unwrap_or_else(|| "?".into());
    let (addresses, frames) = match (stack::registers(syscall), reader.as_deref_mut()) {
        (Some((sp, pc)), Some(reader)) => {
            let addresses = reader.addresses(sp, pc);
            let frames = reader.frames(&addresses);
            (addresses, frames)
        }
        _ => (Vec::new(), Vec::new()),
    };
    let own: Vec<&Frame> = frames.iter().filter(|f| !is_library(f)).collect();
    let futex = wait.map(|w| {
        let (word, in_go_runtime) = match reader {
            Some(r) => (
                r.read_u32(w.uaddr),
                addresses.first().is_some_and(|pc| r.is_go_code(*pc)),
            ),
            None => (None, false),
        };
        let names: Vec<&str> = frames.iter().map(|f| &*f.function).collect();
        futex::classify(w, word, &names, in_go_runtime)
    });
    Seen {
        since_ns,
        name,
        blocked_at: own.first().map(|f| f.site()),
        entry: own.last().map(|f| f.function.clone()),
        stack: frames.iter().map(ToString::to_string).collect(),
        futex,
    }
}

/// Code that is not the program's own: the C library and loader, language runtimes'
/// standard libraries, thread start-up.
fn is_library(frame: &Frame) -> bool {
    is_library_code(&frame.function, &frame.module)
}

/// Whether `function` (in `module`) is library code: see [`is_library`].
pub(crate) fn is_library_code(function: &str, module: &str) -> bool {
    const LIBRARIES: [&str; 7] = [
        "libc.so",
        "libc-",
        "libpthread",
        "ld-linux",
        "libstdc++",
        "libgcc_s",
        "libm.so",
    ];
    const FUNCTIONS: [&str; 8] = [
        "std::", "core::", "alloc::", "<std::", "<core::", "<alloc::", "runtime.", "__",
    ];
    let module = module.rsplit('/').next().unwrap_or_default();
    LIBRARIES.iter().any(|l| module.starts_with(l))
        || FUNCTIONS.iter().any(|f| function.starts_with(f))
        || matches!(function, "start_thread" | "clone" | "clone3" | "_start")
        || function.starts_with('?')
}

fn tasks(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The state letter of a /proc stat line.
fn task_state(stat: &str) -> Option<char> {
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

/// Thread ids as the process sees them (its PID namespace) -> host thread ids. Locks record
/// owners in the process's namespace.
fn namespace_tids(pid: u32) -> HashMap<u32, u32> {
    tasks(pid)
        .into_iter()
        .filter_map(|tid| {
            let status = read_small(&format!("/proc/{pid}/task/{tid}/status"))?;
            let ns = status
                .lines()
                .find_map(|l| l.strip_prefix("NSpid:"))?
                .split_whitespace()
                .last()?
                .parse()
                .ok()?;
            Some((ns, tid))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_and_library_frames() {
        assert_eq!(task_state("42 (a b) c) S 1 2"), Some('S'));
        let frame = |function: &str, module: &str| Frame {
            function: function.into(),
            file: None,
            line: 0,
            module: module.into(),
        };
        assert!(is_library(&frame(
            "pthread_mutex_lock",
            "/usr/lib/x86_64-linux-gnu/libc.so.6"
        )));
        assert!(is_library(&frame(
            "std::sys::sync::mutex::futex::Mutex::lock_contended",
            "/app"
        )));
        assert!(!is_library(&frame("locker_a", "/app")));
        // Unknown code is never named as the program's own site.
        assert!(is_library(&frame("?+0x8a12b", "/app")));
        assert!(!is_library(&frame("deadlock::main::{{closure}}", "/app")));
    }

    #[test]
    fn own_namespace_maps_to_itself() {
        let pid = std::process::id();
        let map = namespace_tids(pid);
        assert_eq!(map.get(&pid), Some(&pid));
    }
}
