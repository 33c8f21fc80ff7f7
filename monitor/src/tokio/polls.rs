//! Polls that block their worker thread. A task whose state says RUNNING is being polled by
//! some thread; when that thread sits in one system call (a sleep, a lock, blocking I/O) with
//! the task's header on its live stack, at the same stack pointer and instruction at every
//! look, the poll has not returned since the first look. The thread is found by searching the
//! stacks of the process's blocked threads for the header's address.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use super::walk::TaskRec;
use crate::{
    detect::{Due, Site, Stack, ThreadReport, nanos},
    proc::{ProcMem, files::read_proc_capped, u64_at},
    threads::{
        stack::StackReader,
        symbols::{Frame, Symbolizer},
    },
};

/// Stack searched above a blocked thread's stack pointer for a running task's header.
const STACK_SEARCH: usize = 32 << 10;
const PAGE: usize = 4096;
/// Threads looked at per scan, at most, and stack bytes read for them (a process with
/// thousands of blocked threads costs this much per scan, no more).
const MAX_THREADS: usize = 4096;
const MAX_STACK_BYTES: usize = 16 << 20;
/// A first sighting is looked at again within the scan when the threshold is this short.
const RECHECK_MAX: Duration = Duration::from_secs(1);
/// x86_64 system calls a worker parks in (mio's epoll): never a blocking poll.
const PARK_SYSCALLS: [u64; 3] = [232, 281, 441];

/// Where a running task's poll was seen: its thread, at which stack pointer and instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seen {
    tid: u32,
    sp: u64,
    pc: u64,
    /// Offset of the header's address above `sp`.
    depth: u64,
    since_ns: u64,
}

/// A poll found blocking: since when, on which thread, and that thread's stack.
#[derive(Clone, Debug)]
pub(crate) struct Blocking {
    pub since_ns: u64,
    pub stack: Stack,
    pub thread: Arc<ThreadReport>,
}

#[derive(Default)]
pub(crate) struct Polls {
    seen: HashMap<u64, Seen>,
}

impl Polls {
    /// Finds the polls among `running` that have stayed in one blocking call: task id ->
    /// what blocks, for those `due` admits (blocked past the poll threshold).
    pub(crate) fn check(
        &mut self,
        pid: u32,
        mem: &ProcMem,
        symbolizer: &Symbolizer,
        running: &[&TaskRec],
        due: &Due,
    ) -> HashMap<u64, Blocking> {
        let now_ns = due.now_ns;
        if running.is_empty() {
            self.seen.clear();
            return HashMap::new();
        }
        let found = locate(pid, mem, running);
        let mut seen = HashMap::with_capacity(found.len());
        for (id, mut s) in found {
            s.since_ns = match self.seen.get(&id) {
                Some(old) if same_call(old, &s) => old.since_ns,
                _ => now_ns,
            };
            seen.insert(id, s);
        }
        // A first sighting with a short threshold is looked at again now, so a blocking poll
        // is reported at this scan rather than the next.
        let wait = due.thresholds.poll_block;
        let fresh: Vec<u64> = seen
            .iter()
            .filter(|(_, s)| s.since_ns == now_ns)
            .map(|(id, _)| *id)
            .collect();
        if !fresh.is_empty() && wait <= RECHECK_MAX {
            let started = Instant::now();
            std::thread::sleep(wait);
            let still: Vec<&TaskRec> = running
                .iter()
                .filter(|t| fresh.contains(&t.id))
                .copied()
                .collect();
            let again = locate(pid, mem, &still);
            let elapsed = nanos(started.elapsed());
            for id in fresh {
                let keep = again.get(&id).is_some_and(|s| {
                    seen.get(&id).is_some_and(|old| same_call(old, s))
                        && still_running(mem, &still, id)
                });
                if keep {
                    if let Some(s) = seen.get_mut(&id) {
                        s.since_ns = now_ns.saturating_sub(elapsed);
                    }
                } else {
                    seen.remove(&id);
                }
            }
        }
        self.seen = seen;
        let mut out = HashMap::new();
        let mut reader: Option<StackReader> = None;
        for (id, s) in &self.seen {
            // One poll that has not returned.
            if due.running(&super::TOKIO, s.since_ns, 1).is_none() {
                continue;
            }
            if reader.is_none() {
                let (Ok(mem), Some(symbols)) = (ProcMem::open(pid), symbolizer.process(pid)) else {
                    break;
                };
                reader = Some(StackReader::new(mem, symbols));
            }
            let Some(r) = reader.as_mut() else {
                break;
            };
            let addresses = r.addresses(s.sp, s.pc);
            let frames = r.frames(&addresses);
            let sites: Vec<Arc<Site>> = frames.iter().map(Frame::site).collect();
            let own = frames.iter().find(|f| {
                !is_runtime_or_library(&f.function, &f.module)
                    && !f.file.as_deref().is_some_and(is_dependency_source)
            });
            let name: Arc<str> = read_proc_capped(&format!("/proc/{pid}/task/{}/comm", s.tid), 64)
                .ok()
                .map(|c| String::from_utf8_lossy(&c).trim_end().into())
                .unwrap_or_else(|| "?".into());
            let thread = ThreadReport {
                tid: s.tid,
                name,
                waits_on: None,
                owner_tid: None,
                waited_seconds: now_ns.saturating_sub(s.since_ns) as f64 / 1e9,
                blocked_at: own.map(Frame::site),
                stack: frames.iter().map(ToString::to_string).collect(),
            };
            out.insert(
                *id,
                Blocking {
                    since_ns: s.since_ns,
                    stack: sites.into(),
                    thread: Arc::new(thread),
                },
            );
        }
        out
    }
}

fn same_call(a: &Seen, b: &Seen) -> bool {
    (a.tid, a.sp, a.pc, a.depth) == (b.tid, b.sp, b.pc, b.depth)
}

fn still_running(mem: &ProcMem, tasks: &[&TaskRec], id: u64) -> bool {
    tasks.iter().find(|t| t.id == id).is_some_and(|t| {
        mem.read_u64(t.addr)
            .is_some_and(|state| state & super::layout::RUNNING != 0)
    })
}

/// Code that is not the program's own: the C library, Rust's standard library, tokio itself.
pub(super) fn is_runtime_or_library(function: &str, module: &str) -> bool {
    crate::threads::is_library_code(function, module)
        || function.starts_with("tokio::")
        || function.starts_with("<tokio::")
}

/// Source of the standard library (`/rustc/<hash>/library/…`) or of a crate from a registry or
/// git checkout: not where the program's own code is.
fn is_dependency_source(file: &str) -> bool {
    file.starts_with("/rustc/")
        || file.contains("/.cargo/registry/")
        || file.contains("/.cargo/git/")
}

/// For each running task whose header is on the live stack of a thread blocked in a system
/// call: that thread (the one where it is nearest the stack pointer).
fn locate(pid: u32, mem: &ProcMem, running: &[&TaskRec]) -> HashMap<u64, Seen> {
    let by_addr: HashMap<u64, u64> = running.iter().map(|t| (t.addr, t.id)).collect();
    let mut found: HashMap<u64, Seen> = HashMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return found;
    };
    // A thread's stack ends where its mapping does: past it lies another thread's stack (whose
    // frames may hold the running task's header), not this thread's.
    let Ok(mappings) = crate::proc::maps::all_ranges(pid) else {
        return found;
    };
    let mut buf = vec![0u8; STACK_SEARCH];
    let mut read = 0;
    for entry in dir.filter_map(Result::ok).take(MAX_THREADS) {
        if read >= MAX_STACK_BYTES {
            break;
        }
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(line) = read_proc_capped(&format!("/proc/{pid}/task/{tid}/syscall"), 256) else {
            continue;
        };
        let line = String::from_utf8_lossy(&line);
        let Some(nr) = line
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<i64>().ok())
        else {
            continue; // "running"
        };
        if u64::try_from(nr).is_ok_and(|nr| PARK_SYSCALLS.contains(&nr)) {
            continue;
        }
        let Some((sp, pc)) = crate::threads::stack::registers(&line) else {
            continue;
        };
        let Some(stack_end) = crate::proc::maps::end_of(&mappings, sp) else {
            continue;
        };
        let ranges: Vec<(u64, usize)> = (0..STACK_SEARCH / PAGE)
            .map(|p| ((sp & !(PAGE as u64 - 1)) + (p * PAGE) as u64, PAGE))
            .take_while(|(at, _)| *at < stack_end)
            .collect();
        let ok = mem.read_ranges(&ranges, &mut buf);
        read += STACK_SEARCH;
        let base = sp & !(PAGE as u64 - 1);
        for (p, _) in ok.iter().enumerate().filter(|(_, ok)| **ok) {
            for i in 0..PAGE / 8 {
                let at = base + (p * PAGE + i * 8) as u64;
                if at < sp {
                    continue;
                }
                let Some(word) = u64_at(&buf, p * PAGE + i * 8) else {
                    continue;
                };
                let Some(id) = by_addr.get(&word) else {
                    continue;
                };
                let depth = at - sp;
                let better = found.get(id).is_none_or(|s| depth < s.depth);
                if better {
                    found.insert(
                        *id,
                        Seen {
                            tid,
                            sp,
                            pc,
                            depth,
                            since_ns: 0,
                        },
                    );
                }
            }
        }
    }
    found
}
