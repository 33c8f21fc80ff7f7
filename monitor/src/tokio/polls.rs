//! Polls that block their worker thread. A task whose state says RUNNING is being polled by
//! some thread; the poll has not returned since the first look when:
//! - that thread sits in one system call (a sleep, a lock, blocking I/O) with the task's
//!   header on its live stack, at the same stack pointer and instruction at every look (the
//!   thread is found by searching the stacks of the process's blocked threads for the
//!   header's address); or
//! - that thread is on a CPU (a poll that computes: a parse, a hash, a long loop) and never
//!   wrote the task's state word since: its registers are sampled on demand by an eBPF
//!   program on a perf event (its stack pointer cannot be read from /proc while it runs), the
//!   header found on its stack, and a one-shot hardware watchpoint on the state word, for
//!   that thread, says whether the poll ended (every poll ends with the poller writing it).

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use super::walk::TaskRec;
use crate::{
    bpf::{Regs, Sampler},
    detect::{Due, Site, Stack, ThreadReport, nanos},
    proc::{ProcMem, files::read_proc_capped, u64_at},
    sys::perf::Watchpoint,
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
/// Threads on a CPU sampled per scan of a process, at most, and for how long before their
/// stacks are searched (at a sample every 500 µs of their CPU time).
const MAX_SAMPLED: usize = 8;
const SAMPLE_WINDOW: Duration = Duration::from_millis(20);
/// A running task is looked at this long, this many times, before its threads are sampled.
const PRECHECK: Duration = Duration::from_millis(2);
const PRECHECK_READS: u32 = 4;
/// Hot frames named in an alert, at most.
const MAX_HOT: usize = 3;

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

/// A poll seen computing: its thread, the stack slot holding the header in its frames, and
/// the watchpoint on the state word that fires when the poll ends.
#[derive(Debug)]
struct Computing {
    tid: u32,
    header: u64,
    slot: u64,
    since_ns: u64,
    watch: Watchpoint,
    /// The thread's last samples, oldest first.
    regs: Vec<Regs>,
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
    computing: HashMap<u64, Computing>,
}

impl Polls {
    /// Finds the polls among `running` that have stayed in one blocking call or one
    /// computation: task id -> what blocks, for those `due` admits (blocked past the poll
    /// threshold). Threads on a CPU are sampled with `sampler` (none: computing polls are not
    /// looked for).
    pub(crate) fn check(
        &mut self,
        pid: u32,
        mem: &ProcMem,
        symbolizer: &Symbolizer,
        sampler: Option<&Sampler>,
        running: &[&TaskRec],
        due: &Due,
    ) -> HashMap<u64, Blocking> {
        let now_ns = due.now_ns;
        if running.is_empty() {
            self.seen.clear();
            self.computing.clear();
            return HashMap::new();
        }
        let started = Instant::now();
        let found = locate(pid, mem, running);
        let mut seen = HashMap::with_capacity(found.len());
        for (id, mut s) in found {
            s.since_ns = match self.seen.get(&id) {
                Some(old) if same_call(old, &s) => old.since_ns,
                _ => now_ns,
            };
            seen.insert(id, s);
        }
        // Running tasks on no blocked thread: computing, or between two quick polls.
        let on_cpu: Vec<&TaskRec> = running
            .iter()
            .filter(|t| !seen.contains_key(&t.id))
            .copied()
            .collect();
        let mut computing = std::mem::take(&mut self.computing);
        // A poll seen computing goes on while its thread never wrote the state word and the
        // task still reads RUNNING.
        computing.retain(|id, c| {
            on_cpu.iter().any(|t| t.id == *id)
                && c.watch.hit() == Some(false)
                && is_running(mem, c.header)
        });
        // Threads are sampled only for a task whose poll already lasts, or one that stays in
        // one poll through a short look: a busy service's polls end within it.
        let steady: Vec<&TaskRec> = if sampler.is_some() {
            let new: Vec<&TaskRec> = on_cpu
                .iter()
                .filter(|t| !computing.contains_key(&t.id))
                .copied()
                .collect();
            in_one_poll(mem, &new)
        } else {
            Vec::new()
        };
        let session = sampler
            .filter(|_| !steady.is_empty() || !computing.is_empty())
            .map(|s| s.start(&crate::proc::threads_on_cpu(pid, MAX_SAMPLED)))
            .filter(|s| !s.is_empty());
        let mut armed = false;
        if let Some(session) = &session {
            // What `./x bench --only tokio` counts: on a healthy service, never.
            log::debug!(
                "PID {pid}: sampling threads on a CPU: {} tasks stayed in one poll for 2 ms, \
                 {} polls seen computing",
                steady.len(),
                computing.len()
            );
            std::thread::sleep(SAMPLE_WINDOW);
            let samples = session.read();
            let at_ns = now_ns + nanos(started.elapsed());
            for (id, (tid, slot, header)) in locate_on_cpu(pid, mem, &steady, &samples) {
                let watch = match Watchpoint::arm(tid, header) {
                    Ok(w) => w,
                    Err(e) => {
                        unavailable(&e);
                        continue;
                    }
                };
                // Armed while it still runs: what follows without a write is one poll.
                if is_running(mem, header) {
                    armed = true;
                    computing.insert(
                        id,
                        Computing {
                            tid,
                            header,
                            slot,
                            since_ns: at_ns,
                            watch,
                            regs: Vec::new(),
                        },
                    );
                }
            }
        }
        // A first sighting with a short threshold is looked at again now, so a blocking poll
        // is reported at this scan rather than the next.
        let wait = due.thresholds.poll_block;
        let fresh: Vec<u64> = seen
            .iter()
            .filter(|(_, s)| s.since_ns == now_ns)
            .map(|(id, _)| *id)
            .collect();
        if (!fresh.is_empty() || armed) && wait <= RECHECK_MAX {
            let slept = Instant::now();
            std::thread::sleep(wait);
            let still: Vec<&TaskRec> = running
                .iter()
                .filter(|t| fresh.contains(&t.id))
                .copied()
                .collect();
            let again = locate(pid, mem, &still);
            let elapsed = nanos(slept.elapsed());
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
            computing.retain(|_, c| c.watch.hit() == Some(false) && is_running(mem, c.header));
        }
        // The threads' last samples: the poll's frame must still be below them, the header in
        // its slot (else the thread polls something else now).
        let samples = session.as_ref().map(|s| s.read()).unwrap_or_default();
        drop(session);
        computing.retain(|_, c| {
            let Some(regs) = samples.get(&c.tid) else {
                // Not on a CPU during the window: nothing new to say, nothing against it.
                return !c.regs.is_empty();
            };
            if regs.iter().any(|r| r.sp >= c.slot) || mem.read_u64(c.slot) != Some(c.header) {
                return false;
            }
            c.regs.clone_from(regs);
            true
        });
        self.seen = seen;
        self.computing = computing;
        let mut out = HashMap::new();
        let mut reader: Option<StackReader> = None;
        // (task, thread, since, the thread's registers, whether it computes)
        let blocked = self.seen.iter().map(|(id, s)| {
            let regs = vec![Regs {
                ip: s.pc,
                sp: s.sp,
                bp: 0,
            }];
            (*id, s.tid, s.since_ns, regs, false)
        });
        let computing = self
            .computing
            .iter()
            .map(|(id, c)| (*id, c.tid, c.since_ns, c.regs.clone(), true));
        for (id, tid, since_ns, regs, on_cpu) in blocked.chain(computing) {
            // One poll that has not returned.
            if due.running(&super::TOKIO, since_ns, 1).is_none() {
                continue;
            }
            let Some(last) = regs.last() else {
                continue;
            };
            if reader.is_none() {
                let (Ok(mem), Some(symbols)) = (ProcMem::open(pid), symbolizer.process(pid)) else {
                    break;
                };
                reader = Some(StackReader::new(mem, symbols));
            }
            let Some(r) = reader.as_mut() else {
                break;
            };
            let addresses = r.addresses_from(last.sp, last.ip, on_cpu.then_some(last.bp));
            let frames = r.frames(&addresses);
            // Inside `block_in_place` the worker's queue went to another thread: nothing
            // waits on this one.
            if frames.iter().any(|f| f.function.contains("block_in_place")) {
                continue;
            }
            let sites: Vec<Arc<Site>> = frames.iter().map(Frame::site).collect();
            let (at, hot) = if on_cpu {
                (computes_in(&frames), hot_frames(r, &regs))
            } else {
                (frames.iter().find(|f| is_own(f)), Vec::new())
            };
            let name: Arc<str> = read_proc_capped(&format!("/proc/{pid}/task/{tid}/comm"), 64)
                .ok()
                .map(|c| String::from_utf8_lossy(&c).trim_end().into())
                .unwrap_or_else(|| "?".into());
            let thread = ThreadReport {
                tid,
                name,
                waits_on: None,
                owner_tid: None,
                waited_seconds: now_ns.saturating_sub(since_ns) as f64 / 1e9,
                blocked_at: at.map(Frame::site),
                stack: frames.iter().map(ToString::to_string).collect(),
                hot_frames: hot.into(),
            };
            out.insert(
                id,
                Blocking {
                    since_ns,
                    stack: sites.into(),
                    thread: Arc::new(thread),
                },
            );
        }
        out
    }
}

/// The program's own code: not the C library, Rust's standard library, tokio or another
/// crate from a registry.
fn is_own(f: &Frame) -> bool {
    !is_runtime_or_library(&f.function, &f.module)
        && !f.file.as_deref().is_some_and(is_dependency_source)
}

/// Where a computing poll is in the task's own code: the outermost of its innermost run of
/// own frames (the `async fn` body at the call that computes, called by tokio's poll), which
/// stays the same while the poll goes on, where the innermost frames change from sample to
/// sample (and `main`, below the runtime, is another run).
fn computes_in(frames: &[Frame]) -> Option<&Frame> {
    let first = frames.iter().position(is_own)?;
    let run = frames[first..]
        .iter()
        .position(|f| !is_own(f))
        .unwrap_or(frames.len() - first);
    frames.get(first + run - 1)
}

/// The functions a computing thread was sampled in most, "function (file:line) NN%": the
/// innermost frame of each sample, the program's own where the sample has one inlined.
fn hot_frames(r: &mut StackReader, regs: &[Regs]) -> Vec<String> {
    let mut by_function: HashMap<Arc<str>, (usize, String)> = HashMap::new();
    for reg in regs {
        let frames = r.frames(&[reg.ip]);
        let Some(f) = frames.iter().find(|f| is_own(f)).or(frames.first()) else {
            continue;
        };
        let e = by_function
            .entry(f.function.clone())
            .or_insert_with(|| (0, f.to_string()));
        e.0 += 1;
    }
    let mut hot: Vec<(usize, String)> = by_function.into_values().collect();
    hot.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    hot.into_iter()
        .take(MAX_HOT)
        .map(|(n, f)| format!("{f} {}%", n * 100 / regs.len().max(1)))
        .collect()
}

/// Says once when watchpoints cannot be armed at all (not when one thread has no debug
/// register free, a debugger's, or has exited).
fn unavailable(e: &std::io::Error) {
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let common = matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::ESRCH));
    if !common && !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
        log::warn!(
            "hardware watchpoints cannot be armed ({e}): polls that compute without a system \
             call are not reported (`leakmon doctor` checks)"
        );
    }
}

/// The tasks of `tasks` whose state word reads the same, RUNNING, through [`PRECHECK`].
fn in_one_poll<'a>(mem: &ProcMem, tasks: &[&'a TaskRec]) -> Vec<&'a TaskRec> {
    if tasks.is_empty() {
        return Vec::new();
    }
    let first: Vec<Option<u64>> = tasks.iter().map(|t| mem.read_u64(t.addr)).collect();
    let mut same: Vec<bool> = first
        .iter()
        .map(|s| s.is_some_and(|s| s & super::layout::RUNNING != 0))
        .collect();
    for _ in 0..PRECHECK_READS {
        std::thread::sleep(PRECHECK / PRECHECK_READS);
        for (i, t) in tasks.iter().enumerate() {
            same[i] &= mem.read_u64(t.addr) == first[i];
        }
    }
    tasks
        .iter()
        .zip(same)
        .filter_map(|(t, same)| same.then_some(*t))
        .collect()
}

/// Whether the task whose header is at `header` is being polled.
fn is_running(mem: &ProcMem, header: u64) -> bool {
    mem.read_u64(header)
        .is_some_and(|state| state & super::layout::RUNNING != 0)
}

fn same_call(a: &Seen, b: &Seen) -> bool {
    (a.tid, a.sp, a.pc, a.depth) == (b.tid, b.sp, b.pc, b.depth)
}

fn still_running(mem: &ProcMem, tasks: &[&TaskRec], id: u64) -> bool {
    tasks
        .iter()
        .find(|t| t.id == id)
        .is_some_and(|t| is_running(mem, t.addr))
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
        read += STACK_SEARCH;
        for (id, at) in search_stack(mem, &mappings, sp, &by_addr, &mut buf) {
            let depth = at - sp;
            if found.get(&id).is_none_or(|s| depth < s.depth) {
                found.insert(
                    id,
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
    found
}

/// For each running task in `fresh` whose header is on the stack of a sampled thread above
/// its last sample: (thread, the stack slot nearest the stack pointer, the header).
fn locate_on_cpu(
    pid: u32,
    mem: &ProcMem,
    fresh: &[&TaskRec],
    samples: &HashMap<u32, Vec<Regs>>,
) -> HashMap<u64, (u32, u64, u64)> {
    let mut found: HashMap<u64, (u32, u64, u64)> = HashMap::new();
    if fresh.is_empty() || samples.is_empty() {
        return found;
    }
    let Ok(mappings) = crate::proc::maps::all_ranges(pid) else {
        return found;
    };
    let by_addr: HashMap<u64, u64> = fresh.iter().map(|t| (t.addr, t.id)).collect();
    let mut buf = vec![0u8; STACK_SEARCH];
    let mut nearest: HashMap<u64, u64> = HashMap::new();
    for (tid, regs) in samples {
        let Some(last) = regs.last() else {
            continue;
        };
        for (id, at) in search_stack(mem, &mappings, last.sp, &by_addr, &mut buf) {
            let depth = at - last.sp;
            if nearest.get(&id).is_none_or(|d| depth < *d) {
                nearest.insert(id, depth);
                let header = fresh.iter().find(|t| t.id == id).map_or(0, |t| t.addr);
                found.insert(id, (*tid, at, header));
            }
        }
    }
    found
}

/// The running tasks (`by_addr`: header -> id) whose header is on the stack from `sp` up to
/// the end of its mapping or [`STACK_SEARCH`] bytes: (id, where).
fn search_stack(
    mem: &ProcMem,
    mappings: &[(u64, u64)],
    sp: u64,
    by_addr: &HashMap<u64, u64>,
    buf: &mut [u8],
) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let Some(stack_end) = crate::proc::maps::end_of(mappings, sp) else {
        return out;
    };
    let base = sp & !(PAGE as u64 - 1);
    let ranges: Vec<(u64, usize)> = (0..buf.len() / PAGE)
        .map(|p| (base + (p * PAGE) as u64, PAGE))
        .take_while(|(at, _)| *at < stack_end)
        .collect();
    let ok = mem.read_ranges(&ranges, buf);
    for (p, _) in ok.iter().enumerate().filter(|(_, ok)| **ok) {
        for i in 0..PAGE / 8 {
            let at = base + (p * PAGE + i * 8) as u64;
            if at < sp {
                continue;
            }
            if let Some(id) = u64_at(buf, p * PAGE + i * 8).and_then(|w| by_addr.get(&w)) {
                out.push((*id, at));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(function: &str, file: &str) -> Frame {
        Frame {
            function: function.into(),
            file: Some(file.into()),
            line: 1,
            module: "app".into(),
        }
    }

    /// A computing poll is placed at the task's own frame nearest tokio's poll, not at the
    /// innermost own frame (which changes between samples) nor at `main` below the runtime.
    #[test]
    fn a_computing_poll_is_placed_where_the_task_calls_the_computation() {
        let frames = [
            frame(
                "core::hash::sip::Hasher::write",
                "/rustc/abc/library/core/src/hash/sip.rs",
            ),
            frame("app::mix", "/src/app/src/main.rs"),
            frame("app::crunch", "/src/app/src/main.rs"),
            frame("app::handler::{{closure}}", "/src/app/src/main.rs"),
            frame(
                "tokio::runtime::task::core::Core<T,S>::poll",
                "/src/tokio/core.rs",
            ),
            frame(
                "tokio::runtime::scheduler::current_thread::CoreGuard::block_on",
                "/x.rs",
            ),
            frame("app::main", "/src/app/src/main.rs"),
        ];
        assert_eq!(
            computes_in(&frames).map(|f| &*f.function),
            Some("app::handler::{{closure}}")
        );
        // Unwound no further than the computation: its outermost own frame.
        assert_eq!(
            computes_in(&frames[..3]).map(|f| &*f.function),
            Some("app::crunch")
        );
        assert_eq!(computes_in(&frames[..1]), None);
    }
}
