//! tokio: the tasks of unmodified Rust programs on tokio 1.35 and later, from outside. Each scan
//! walks every runtime's task list from the process's memory (no probe, no pause) and turns
//! the tasks into observations: idle tasks parked since their future last changed, tasks with
//! no waker left, polls that block their worker thread, and tasks that spin.

mod binary;
mod code;
mod dump;
mod kinds;
mod layout;
mod policy;
mod polls;
mod runtime;
mod spins;
mod walk;

use std::{collections::HashMap, sync::Arc};

pub(crate) use self::runtime::RUNTIME;
use self::{
    binary::TokioBinary,
    layout::{Vtable, find_vtables},
    policy::TOKIO,
    walk::{Runtime, TaskRec},
};
use crate::{
    detect::{Due, Observation, TaskState, ThreadReport},
    proc::{self, ProcError, ProcMem, maps},
    runtime::{Census, Process, ProcessInfo, ScanInput, Scanned, TaskSource},
    threads::symbols::Symbolizer,
};

#[derive(Debug, thiserror::Error)]
pub(crate) enum TokioError {
    #[error("not a tokio program")]
    NotTokio,
    #[error(
        "links tokio but has no task vtables: it spawns no tasks (or a tokio build leakmon does not know)"
    )]
    NoRuntime,
    #[error("a tokio program leakmon cannot read: {why}")]
    Unsupported { why: String },
    #[error(transparent)]
    Proc(#[from] ProcError),
    #[error(transparent)]
    Open(#[from] proc::files::FileError),
    #[error(
        "its task lists could not be read whole (a walk kept racing with the program, a list \
         holds more than {} tasks, or it exited); try again",
        walk::MAX_TASKS
    )]
    NotWalked,
}

/// Anonymous memory searched for a live task per discovery, at most: enough for the heap
/// of most services; a larger one is searched over several discoveries.
const DISCOVERY_BUDGET: u64 = 256 << 20;
/// How often runtimes are searched for again (new runtimes, a runtime dropped), and, while
/// none is found (a program just started has spawned nothing yet), how soon the search goes
/// on: from 1 s, doubling, up to 5 minutes (a program linking tokio without running it is
/// searched rarely).
const REDISCOVER_NS: u64 = 300_000_000_000;
const RETRY_MIN_NS: u64 = 1_000_000_000;
const RETRY_MAX_NS: u64 = REDISCOVER_NS;
/// Walks of one runtime per scan before a scan that keeps racing with the program gives up.
const WALK_TRIES: usize = 3;

/// Wait reasons of tokio tasks, as the detector sees them.
pub(crate) const IDLE: &str = "idle";
pub(crate) const LOST: &str = "no waker";

/// A tokio process being watched.
pub(crate) struct TokioTarget {
    pid: u32,
    start_time: u64,
    info: ProcessInfo,
    binary: Arc<TokioBinary>,
    /// The shared library tokio is in, when not the executable.
    library: Option<proc::Library>,
    key: proc::BinaryKey,
    mem: ProcMem,
    vtables: HashMap<u64, Vtable>,
    /// Future type by vtable: the task group's entry (its spawn site; there is no
    /// `created_at` without `tokio_unstable`).
    names: HashMap<u64, Arc<str>>,
    runtimes: Vec<Runtime>,
    /// Where the next search for runtimes starts (an address), and when it is due.
    search_from: u64,
    discover_at_ns: u64,
    retry_ns: u64,
    /// Idle tasks by id: what their future looked like, and since when.
    idle: HashMap<u64, Idle>,
    polls: polls::Polls,
    /// Samples threads on a CPU, to find polls that compute (set when attached).
    sampler: Option<Arc<crate::bpf::Sampler>>,
    /// Tasks seen spinning at every scan since: from when, and their future at rest.
    spins: HashMap<u64, Spin>,
    spin_turn: usize,
    thread_clock: spins::ThreadClock,
    symbolizer: Symbolizer,
    /// Whether a scan that raced with the program, or a list over the limit, was said.
    raced_said: bool,
    capped_said: bool,
}

struct Idle {
    signature: u64,
    lost: bool,
    since_ns: u64,
}

#[derive(Clone)]
struct Spin {
    since_ns: u64,
    /// Its future's bytes at rest (hashed), the few states it was seen resting at: an
    /// optimised build's loop rests at two or three, and each scan's most common one may be
    /// any of them.
    rests: Vec<u64>,
    poll_rate: f64,
    /// When a scan last saw it spin, and scans since that did not.
    seen_ns: u64,
    unseen: u32,
    /// Of the last scans that saw it spin (up to `SPIN_WINDOW`), the ones when the busy
    /// threads of the process never slept: a bit each, newest lowest.
    scans: u32,
    sleepless: u32,
    /// The threads found busy without sleeping, last time: its workers.
    threads: Vec<u32>,
    /// Found to wake itself once: it stays so while it is seen spinning with the same
    /// future at rest (a loaded machine lets a spinner's worker sleep in some scans; an alert
    /// that resolves while the spin goes on is a false alarm too).
    established: bool,
}

impl Spin {
    /// Polled over and over with its future unchanged is what a busy consumer looks like
    /// too (fed by another thread as fast as it drains, each poll ending on tokio's budget):
    /// what makes a spin is that the task wakes itself, and so its worker never sleeps, where
    /// a worker fed by another thread parks thousands of times a second (and a task's state
    /// cannot tell: a feeder wakes a busy consumer inside its poll as often as a self-waking
    /// task is seen woken there). Judged over the last scans that saw it spin, at least four,
    /// in three quarters of them: a feeder can go one scan without sleeping. The last ones,
    /// not all: on a multi-thread runtime a spinner moving between workers lets them park
    /// for a while, and a bad start would otherwise outweigh the spin that follows.
    fn wakes_itself(&self) -> bool {
        let n = self.scans.min(SPIN_WINDOW);
        let sleepless = (self.sleepless & ((1 << n) - 1)).count_ones();
        self.established || (n >= SPIN_MIN_SCANS && sleepless * 4 >= n * 3)
    }

    /// First seen spinning at `now_ns`, resting at `rest`.
    fn new(rest: u64, now_ns: u64) -> Self {
        Self {
            since_ns: now_ns,
            rests: vec![rest],
            poll_rate: 0.0,
            seen_ns: now_ns,
            unseen: 0,
            scans: 0,
            sleepless: 0,
            threads: Vec::new(),
            established: false,
        }
    }

    /// Whether it rests at `rest`, learning it while there is room: a task whose rests keep
    /// changing, past `SPIN_RESTS` of them, is making progress.
    fn rests_at(&mut self, rest: u64) -> bool {
        if self.rests.contains(&rest) {
            return true;
        }
        if self.rests.len() < SPIN_RESTS {
            self.rests.push(rest);
            return true;
        }
        false
    }

    /// Records one scan that saw it spin.
    fn saw(&mut self, never_sleeps: bool) {
        self.scans = self.scans.saturating_add(1);
        self.sleepless = (self.sleepless << 1) | u32::from(never_sleeps);
        self.established = self.wakes_itself();
    }
}

/// States at rest one spin may go through.
const SPIN_RESTS: usize = 4;

/// Scans a spin needs before it is judged to wake itself, and the most it is judged over.
const SPIN_MIN_SCANS: u32 = 4;
const SPIN_WINDOW: u32 = 8;

/// A spinning task not seen spinning for this many scans and this long is taken as stopped.
const SPIN_UNSEEN_SCANS: u32 = 3;
const SPIN_UNSEEN_NS: u64 = 30_000_000_000;

impl TokioTarget {
    /// Inspects `pid`, which runs `binary` (its executable, or `library`): its task vtables,
    /// named from their poll functions. Reads what the target controls: runs on a worker.
    pub(crate) fn inspect(
        process: &Process,
        binary: Arc<TokioBinary>,
        symbolizer: Symbolizer,
    ) -> Result<Self, TokioError> {
        let (pid, key, library) = (process.pid, process.key, process.library.clone());
        let exe = process.exe.clone();
        let (_, start_time) = proc::stat(pid)?;
        let bias = match &library {
            None => proc::load_bias(pid, binary.lowest_vaddr)?,
            Some(l) => proc::load_bias_of(pid, l.ino, binary.lowest_vaddr)?,
        };
        let mem = ProcMem::open(pid)?;
        let (start, end) = binary.data_rel_ro;
        let mut bytes = vec![0u8; usize::try_from(end - start).unwrap_or(0)];
        if !mem.read(start + bias, &mut bytes) {
            return Err(TokioError::Unsupported {
                why: format!("its .data.rel.ro at {:#x} cannot be read", start + bias),
            });
        }
        let words: Vec<u64> = bytes
            .as_chunks::<8>()
            .0
            .iter()
            .map(|w| u64::from_le_bytes(*w))
            .collect();
        let code: Vec<(u64, u64)> = binary
            .code
            .iter()
            .map(|(s, e)| (s + bias, e + bias))
            .collect();
        let is_code = |p: u64| code.iter().any(|(s, e)| (*s..*e).contains(&p));
        let vtables: HashMap<u64, Vtable> = find_vtables(start + bias, &words, is_code)
            .into_iter()
            .map(|v| (v.addr, v))
            .collect();
        let module = library.as_ref().map_or(exe.as_path(), |l| l.path.as_path());
        if vtables.is_empty() {
            log::info!(
                "PID {pid} ({}): {}",
                module.display(),
                TokioError::NoRuntime
            );
            return Err(TokioError::NoRuntime);
        }
        let names = name_futures(pid, &mem, &symbolizer, &vtables, bias, &binary, module);
        let version = binary.version.as_deref().unwrap_or("unknown");
        let info = ProcessInfo::of(process, version.to_owned());
        Ok(Self {
            pid,
            start_time,
            info,
            binary,
            library,
            key,
            mem,
            vtables,
            names,
            runtimes: Vec::new(),
            search_from: 0,
            discover_at_ns: 0,
            retry_ns: RETRY_MIN_NS,
            idle: HashMap::new(),
            polls: polls::Polls::default(),
            sampler: None,
            spins: HashMap::new(),
            spin_turn: 0,
            thread_clock: spins::ThreadClock::default(),
            symbolizer,
            raced_said: false,
            capped_said: false,
        })
    }

    /// One scan: every runtime's tasks; those `due` admits (idle long enough, polls blocking,
    /// spins), as observations. None when a walk kept racing with the program: nothing is
    /// judged from a partial list (a task missed would look like one that left).
    fn scan(&mut self, due: &Due) -> Option<(Vec<Observation>, Census)> {
        let now_ns = due.now_ns;
        let tasks = self.walk_all(now_ns)?;
        self.judge(due, &tasks)
    }

    /// Every task of every runtime found, when each list was walked whole (`None`: a walk
    /// kept racing with the program, a list is over the limit, or the process is gone).
    fn walk_all(&mut self, now_ns: u64) -> Option<Vec<TaskRec>> {
        if now_ns >= self.discover_at_ns {
            self.discover(now_ns);
        }
        let mut tasks: Vec<TaskRec> = Vec::new();
        for rt in &self.runtimes {
            let mut last = None;
            for _ in 0..WALK_TRIES {
                let w = walk::walk(&self.mem, &self.vtables, rt, walk::MAX_TASKS);
                if w.complete || w.capped {
                    last = Some(w);
                    break;
                }
            }
            match last {
                Some(w) if w.complete => tasks.extend(w.tasks),
                Some(_) => {
                    if !self.capped_said {
                        self.capped_said = true;
                        log::warn!(
                            "PID {}: a tokio runtime holds more than {} tasks: its scans are \
                             not judged",
                            self.pid,
                            walk::MAX_TASKS
                        );
                    }
                    return None;
                }
                None if !proc::is_alive(self.pid) => return None,
                None => {
                    // A runtime that was dropped reads as garbage from its first shard on:
                    // searched for again at the next scan. A live one raced with the program.
                    if !walk::still_there(&self.mem, &self.vtables, rt) {
                        self.discover_at_ns = now_ns;
                    } else if !self.raced_said {
                        self.raced_said = true;
                        log::info!(
                            "PID {}: a walk of a tokio task list kept racing with the program: \
                             that scan is not judged",
                            self.pid
                        );
                    }
                    return None;
                }
            }
        }
        Some(tasks)
    }

    /// The tasks `due` admits, judged, and every task counted.
    fn judge(&mut self, due: &Due, tasks: &[TaskRec]) -> Option<(Vec<Observation>, Census)> {
        let now_ns = due.now_ns;
        let mut out = Vec::with_capacity(tasks.len());
        let mut idle = HashMap::with_capacity(self.idle.len());
        let running: Vec<&TaskRec> = tasks
            .iter()
            .filter(|t| t.header.state & layout::RUNNING != 0)
            .collect();
        let blocking = self.polls.check(
            self.pid,
            &self.mem,
            &self.symbolizer,
            self.sampler.as_deref(),
            &running,
            due,
        );
        self.sample_spins(now_ns, tasks, &blocking);
        let census = count(tasks);
        for t in tasks {
            let Some(entry) = self.names.get(&t.header.vtable) else {
                continue;
            };
            // A spinner is idle between its polls: the walk may have caught it there.
            let state = if let Some(s) = self.spins.get(&t.id).filter(|s| s.wakes_itself()) {
                // Polls seen, at least two: many polls without a wait is a spin.
                let runs = (s.poll_rate as u32).max(2);
                if due.running(&TOKIO, s.since_ns, runs).is_none() {
                    continue;
                }
                TaskState::Running {
                    since_ns: s.since_ns,
                    runs,
                    last_run_ns: now_ns,
                }
            } else if t.header.is_idle() {
                let lost = t.header.waker_lost();
                let since_ns = match self.idle.get(&t.id) {
                    Some(s) if s.signature == t.signature && s.lost == lost => s.since_ns,
                    _ => now_ns,
                };
                idle.insert(
                    t.id,
                    Idle {
                        signature: t.signature,
                        lost,
                        since_ns,
                    },
                );
                if !due.parked(since_ns) {
                    continue;
                }
                TaskState::Parked {
                    since_ns,
                    wait_reason: Arc::from(if lost { LOST } else { IDLE }),
                    blocked_at: None,
                }
            } else if let Some(b) = blocking.get(&t.id) {
                TaskState::Running {
                    since_ns: b.since_ns,
                    runs: 1,
                    last_run_ns: now_ns,
                }
            } else {
                continue;
            };
            let spinning = self.spins.get(&t.id).filter(|s| s.wakes_itself());
            let (stack, thread) = match (blocking.get(&t.id), spinning) {
                (Some(b), _) => (Some(b.stack.clone()), Some(b.thread.clone())),
                (None, Some(s)) => (None, self.spinning_thread(s, now_ns)),
                (None, None) => (None, None),
            };
            out.push(Observation {
                id: t.id,
                state,
                created_at: None,
                entry: entry.clone(),
                waits_on: None,
                proven: false,
                stack,
                thread,
            });
        }
        self.idle = idle;
        Some((out, census))
    }

    /// Samples the tasks scheduled now (polled, or queued to be) and those spinning at the last
    /// scan: a task stays spinning from scan to scan while every sample says so with the same
    /// future at rest.
    fn sample_spins(
        &mut self,
        now_ns: u64,
        tasks: &[TaskRec],
        blocking: &HashMap<u64, polls::Blocking>,
    ) {
        // One pass over the tasks (up to a million), with lookups in the few suspects only.
        let free = |t: &&TaskRec| !blocking.contains_key(&t.id);
        let mut picked: Vec<&TaskRec> = tasks
            .iter()
            .filter(free)
            .filter(|t| self.spins.contains_key(&t.id))
            .collect();
        // Suspects go on (whatever this scan sees of them) while they live.
        let mut spins: HashMap<u64, Spin> = std::mem::take(&mut self.spins);
        spins.retain(|id, _| picked.iter().any(|t| t.id == *id));
        // More scheduled tasks than a burst samples (a busy service): a different slice of
        // them each scan. Suspects beyond a burst's worth are carried over as they are.
        let mut others: Vec<&TaskRec> = tasks
            .iter()
            .filter(free)
            .filter(|t| {
                t.header.state & (layout::RUNNING | layout::NOTIFIED) != 0
                    && t.header.state & layout::COMPLETE == 0
                    && !spins.contains_key(&t.id)
            })
            .collect();
        if !others.is_empty() {
            self.spin_turn = self.spin_turn.wrapping_add(spins::MAX_TASKS);
            let turn = self.spin_turn % others.len();
            others.rotate_left(turn);
        }
        picked.extend(others);
        picked.truncate(spins::MAX_TASKS);
        if picked.is_empty() || !spins::take_budget() {
            self.spins = spins;
            return;
        }
        let (picked, wanted): (Vec<&TaskRec>, Vec<spins::Task>) = picked
            .into_iter()
            .filter_map(|t| {
                let v = self.vtables.get(&t.header.vtable)?;
                let future_at = v.id + 8;
                Some((
                    t,
                    spins::Task {
                        addr: t.addr,
                        future_at: t.addr + future_at,
                        future_len: usize::try_from(v.trailer.saturating_sub(future_at))
                            .unwrap_or(0),
                    },
                ))
            })
            .unzip();
        let sampled = spins::sample(&self.mem, &wanted);
        let sleepless = self.thread_clock.sleepless(self.pid);
        let never_sleeps = !sleepless.is_empty();
        for (t, s) in picked.iter().zip(sampled) {
            let verdict = match (s.verdict(), spins.get_mut(&t.id)) {
                // A spin already seen goes on while it rests at a few states, one it was seen
                // at, whichever is the most common this time; it learns the others.
                (spins::Verdict::Progress, Some(o)) => match s.spins_among(&o.rests) {
                    Some(states) => {
                        let known = states.first().copied().unwrap_or_default();
                        for state in states {
                            o.rests_at(state);
                        }
                        spins::Verdict::Spins(known)
                    }
                    None => spins::Verdict::Progress,
                },
                (v, _) => v,
            };
            log::debug!(
                "PID {}: task {} sampled: {s:?}: {verdict:?} (busy threads never sleep: {never_sleeps})",
                self.pid,
                t.id
            );
            let old = spins.remove(&t.id);
            let spin = match (verdict, old) {
                (spins::Verdict::Spins(rest), old) => {
                    let mut spin = old
                        .and_then(|mut o| o.rests_at(rest).then_some(o))
                        .unwrap_or_else(|| Spin::new(rest, now_ns));
                    spin.poll_rate = s.change_rate;
                    spin.seen_ns = now_ns;
                    spin.unseen = 0;
                    spin.saw(never_sleeps);
                    if never_sleeps {
                        spin.threads.clone_from(&sleepless);
                    }
                    spin
                }
                // A burst that did not see it spin (its worker off the CPU, or it now waits)
                // does not start a spin, and ends one only when several in a row over a while
                // say so: on a busy machine a spinner's thread is off the CPU for seconds.
                (spins::Verdict::Unknown, Some(o))
                    if s.rest.is_none_or(|r| o.rests.contains(&r))
                        && (o.unseen < SPIN_UNSEEN_SCANS
                            || now_ns.saturating_sub(o.seen_ns) < SPIN_UNSEEN_NS) =>
                {
                    Spin {
                        unseen: o.unseen + 1,
                        ..o
                    }
                }
                _ => continue,
            };
            spins.insert(t.id, spin);
        }
        self.spins = spins;
    }

    /// The worker a spinning task keeps busy (the first thread found busy without sleeping),
    /// named, for the alert.
    fn spinning_thread(&self, spin: &Spin, now_ns: u64) -> Option<Arc<ThreadReport>> {
        let tid = *spin.threads.first()?;
        let name =
            proc::files::read_proc_capped(&format!("/proc/{}/task/{tid}/comm", self.pid), 64)
                .ok()
                .map(|c| String::from_utf8_lossy(&c).trim().to_owned())
                .unwrap_or_default();
        Some(Arc::new(ThreadReport {
            tid,
            name: name.into(),
            waits_on: None,
            owner_tid: None,
            waited_seconds: now_ns.saturating_sub(spin.since_ns) as f64 / 1e9,
            blocked_at: None,
            stack: Arc::from(Vec::<String>::new()),
            hot_frames: Arc::from([]),
        }))
    }

    /// Searches anonymous memory for a live task, and from it the runtimes.
    fn discover(&mut self, now_ns: u64) {
        let Ok(mut ranges) = maps::anonymous_writable(self.pid) else {
            return;
        };
        // Resume where the last search stopped: a heap larger than one budget is covered
        // over several.
        let from = self.search_from;
        ranges.sort_unstable();
        let (after, before): (Vec<_>, Vec<_>) = ranges.into_iter().partition(|r| r.1 > from);
        let ordered: Vec<(u64, u64)> = after
            .into_iter()
            .map(|(s, e)| (s.max(from), e))
            .chain(before)
            .collect();
        let found = walk::discover(&self.mem, &self.vtables, &ordered, DISCOVERY_BUDGET);
        self.search_from = next_search_start(&ordered, found.bytes_read);
        let before = self.runtimes.len();
        if !found.runtimes.is_empty() {
            self.runtimes = found.runtimes;
        }
        if self.runtimes.len() != before {
            log::info!(
                "PID {}: {} tokio runtime{} found ({} MiB searched)",
                self.pid,
                self.runtimes.len(),
                if self.runtimes.len() == 1 { "" } else { "s" },
                found.bytes_read >> 20
            );
        }
        if self.runtimes.is_empty() {
            self.discover_at_ns = now_ns + self.retry_ns;
            self.retry_ns = (self.retry_ns * 2).min(RETRY_MAX_NS);
        } else {
            self.discover_at_ns = now_ns + REDISCOVER_NS;
            self.retry_ns = RETRY_MIN_NS;
        }
    }
}

impl TaskSource for TokioTarget {
    fn process(&self) -> &ProcessInfo {
        &self.info
    }

    fn start_time(&self) -> u64 {
        self.start_time
    }

    /// No probes: it says what it watches, and keeps the sampler for polls that compute.
    fn attach(
        &mut self,
        probes: &mut crate::bpf::Probes,
    ) -> Result<Option<crate::bpf::Links>, crate::bpf::BpfError> {
        self.sampler = Some(probes.sampler());
        let library = self
            .library
            .as_ref()
            .map(|l| format!(" in {}", l.path.display()))
            .unwrap_or_default();
        log::info!(
            "watching PID {} ({}, tokio {}{library}, {} task vtables{})",
            self.pid,
            self.info.exe,
            self.info.runtime_version,
            self.vtables.len(),
            if self.binary.stripped {
                ", stripped"
            } else {
                ""
            },
        );
        Ok(None)
    }

    fn scan(&mut self, input: ScanInput) -> Scanned {
        if !proc::runs_same_program(self.pid, self.key, &mut self.mem) {
            return Scanned::OtherProgram;
        }
        match TokioTarget::scan(self, &input.due) {
            Some((tasks, census)) => Scanned::Tasks {
                tasks,
                stale: Default::default(),
                policy: &TOKIO,
                census: Some(census),
                marking: None,
            },
            None => Scanned::NotJudged,
        }
    }

    fn dump(
        &mut self,
        now_ns: u64,
        limit: usize,
        notes: &mut Vec<String>,
    ) -> Result<Vec<crate::dump::Task>, crate::runtime::RuntimeError> {
        let tasks = self.walk_all(now_ns).ok_or(TokioError::NotWalked)?;
        notes.push(
            "a task's spawn site is not kept by tokio without tokio_unstable: tasks are named \
             by their future's type"
                .to_owned(),
        );
        if tasks.len() > limit {
            notes.push(format!(
                "{} more tasks are not listed: this dump lists at most {limit}",
                tasks.len() - limit
            ));
        }
        Ok(self.dump_tasks(now_ns, tasks.get(..limit).unwrap_or(&tasks)))
    }
}

/// Every task walked, by state: running (being polled), scheduled (queued to be), idle
/// (waiting for a wake; "no waker" when none is left).
fn count(tasks: &[TaskRec]) -> Census {
    // running, scheduled, idle, idle with no waker.
    let mut n = [0u64; 4];
    for t in tasks {
        let state = t.header.state;
        if state & layout::COMPLETE != 0 {
            continue;
        }
        let i = if state & layout::RUNNING != 0 {
            0
        } else if state & layout::NOTIFIED != 0 {
            1
        } else if t.header.waker_lost() {
            3
        } else {
            2
        };
        n[i] += 1;
    }
    let mut census = Census::new(&kinds::TASKS);
    let (none, lost): (Arc<str>, Arc<str>) = ("".into(), LOST.into());
    for (i, (state, reason)) in [
        ("running", &none),
        ("scheduled", &none),
        ("idle", &none),
        ("idle", &lost),
    ]
    .into_iter()
    .enumerate()
    {
        if n[i] > 0 {
            census.add_n(state, reason, n[i]);
        }
    }
    census
}

/// For the fuzz target: an executable or library, read as tokio's are.
pub(crate) fn exercise_file(file: std::fs::File) {
    let _ = TokioBinary::read(file);
}

/// For the fuzz target: the parsers of what a tokio target controls, on arbitrary bytes.
pub(crate) fn exercise(data: &[u8]) {
    let words: Vec<u64> = data
        .as_chunks::<8>()
        .0
        .iter()
        .map(|w| u64::from_le_bytes(*w))
        .collect();
    let _ = find_vtables(0x1000, &words, |p| p & 0xff00_0000 == 0x0100_0000);
    let _ = binary::version_in(data);
    let _ = code::scan_branches(0x1000, data);
    let text = String::from_utf8_lossy(data);
    let _ = future_type(&text);
    let _ = cell_type(&text);
    for h in data.chunks(32).take(64).filter_map(layout::Header::parse) {
        let _ = (h.waker_lost(), h.plausible(), h.is_idle());
    }
}

/// Where a search that read `read` bytes of `ranges` (in order) stopped.
fn next_search_start(ranges: &[(u64, u64)], mut read: u64) -> u64 {
    for &(s, e) in ranges {
        let len = e - s;
        if read < len {
            return s + read;
        }
        read -= len;
    }
    0
}

/// Names each vtable's future type: from the debug-info or symbol name of one of its
/// functions generic over the future (`dealloc<app::f::{async_fn_env#0}, Arc<…>>`), using only
/// functions no other vtable shares (identical bodies get merged); else from the first
/// function of the program's own that its poll function calls (the future's own `poll`, in a
/// build with symbols but no debug info); in a stripped build, by the vtable's place in the
/// executable.
fn name_futures(
    pid: u32,
    mem: &ProcMem,
    symbolizer: &Symbolizer,
    vtables: &HashMap<u64, Vtable>,
    bias: u64,
    binary: &TokioBinary,
    exe: &std::path::Path,
) -> HashMap<u64, Arc<str>> {
    let mut symbols = symbolizer.process(pid);
    let mut shared: HashMap<u64, usize> = HashMap::new();
    for v in vtables.values() {
        for f in v.fns {
            *shared.entry(f).or_default() += 1;
        }
    }
    let module = exe.file_name().map_or_else(
        || exe.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let mut out = HashMap::new();
    let mut from_code: Option<HashMap<u64, String>> = None;
    for v in vtables.values() {
        let mut named = None;
        if let Some(symbols) = symbols.as_mut() {
            let name_of = |symbols: &mut crate::threads::symbols::ProcessSymbols, f: u64| {
                let mut frames = Vec::new();
                symbols.frames(f, true, &mut frames);
                frames.last().map(|fr| fr.function.clone())
            };
            named = v
                .fns
                .iter()
                .filter(|f| shared.get(f) == Some(&1))
                .find_map(|f| future_type(&name_of(symbols, *f)?));
            if named.is_none() {
                if from_code.is_none() {
                    from_code = Some(futures_from_code(mem, symbols, vtables));
                }
                named = from_code.as_ref().and_then(|c| c.get(&v.addr).cloned());
            }
        }
        let entry: Arc<str> = match named {
            Some(n) => n.into(),
            None => match &binary.build_id {
                Some(id) => format!("future@{module}+{:#x} (build id {id})", v.addr - bias),
                None => format!("future@{module}+{:#x}", v.addr - bias),
            }
            .into(),
        };
        out.insert(v.addr, entry);
    }
    out
}

/// Future types named from the code of each vtable's functions, for builds with symbols but
/// no debug info (legacy mangling leaves generics out of symbols): each task function jumps
/// to a `Harness` method that drops a `Box<Cell<T, S>>` (the type is in that symbol) or calls
/// `Core::poll`, which calls the future's own `poll` (`app::handler::{{closure}}`). Functions
/// the linker merged between future types are shared by several vtables: only functions one
/// vtable alone reaches name it.
fn futures_from_code(
    mem: &ProcMem,
    symbols: &mut crate::threads::symbols::ProcessSymbols,
    vtables: &HashMap<u64, Vtable>,
) -> HashMap<u64, String> {
    let mut names: HashMap<u64, Option<Arc<str>>> = HashMap::new();
    let mut name_of = |symbols: &mut crate::threads::symbols::ProcessSymbols, a: u64| {
        names
            .entry(a)
            .or_insert_with(|| {
                let mut frames = Vec::new();
                symbols.frames(a, true, &mut frames);
                frames.last().map(|f| f.function.clone())
            })
            .clone()
    };
    let mut branches: HashMap<u64, Vec<u64>> = HashMap::new();
    // Every task function each vtable reaches, three levels deep, and how many vtables
    // reach each function (or branch to it).
    let mut reached: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut count: HashMap<u64, usize> = HashMap::new();
    for v in vtables.values() {
        let mut seen: Vec<u64> = Vec::new();
        let mut level: Vec<u64> = v.fns.to_vec();
        for _ in 0..3 {
            let mut next = Vec::new();
            for f in level {
                if seen.contains(&f) {
                    continue;
                }
                seen.push(f);
                let targets = branches
                    .entry(f)
                    .or_insert_with(|| code::branches(mem, f))
                    .clone();
                for t in targets {
                    if name_of(symbols, t).is_some_and(|n| n.starts_with("tokio::runtime::task::"))
                    {
                        next.push(t);
                    }
                }
            }
            level = next;
        }
        let mut targets: Vec<u64> = seen
            .iter()
            .flat_map(|f| branches.get(f).into_iter().flatten().copied())
            .chain(seen.iter().copied())
            .collect();
        targets.sort_unstable();
        targets.dedup();
        for t in &targets {
            *count.entry(*t).or_default() += 1;
        }
        reached.insert(v.addr, seen);
    }
    let mut out = HashMap::new();
    for (vtable, seen) in reached {
        let mut program = None;
        let mut cell = None;
        for f in seen.iter().filter(|f| count.get(f) == Some(&1)) {
            for t in branches.get(f).into_iter().flatten() {
                // A target other vtables reach too is a body merged between future types:
                // its name is one of theirs.
                if count.get(t) != Some(&1) {
                    continue;
                }
                let Some(name) = name_of(symbols, *t) else {
                    continue;
                };
                if cell.is_none() {
                    cell = cell_type(&name);
                }
                if program.is_none() && is_program_function(&name) {
                    program = Some(async_fn_name(&name).to_owned());
                }
            }
        }
        if let Some(name) = cell.or(program) {
            out.insert(vtable, name);
        }
    }
    out
}

/// `T` in a name holding `tokio::runtime::task::core::Cell<T, S>`.
fn cell_type(name: &str) -> Option<String> {
    const CELL: &str = "task::core::Cell<";
    let at = name.find(CELL)? + CELL.len();
    let rest = &name[at..];
    let mut depth = 0i32;
    for (i, c) in rest.char_indices() {
        match c {
            '<' | '(' | '[' | '{' => depth += 1,
            '>' | ')' | ']' | '}' => depth -= 1,
            ',' if depth == 0 => {
                return Some(async_fn_name(rest[..i].trim()).to_owned());
            }
            _ => {}
        }
    }
    None
}

/// A function of the program's own (not tokio's, the standard library's or the C library's),
/// named (not an address).
fn is_program_function(name: &str) -> bool {
    !polls::is_runtime_or_library(name, "") && !name.starts_with("0x") && name.contains("::")
}

/// The future type `T` of a task function generic over `<T, S>` (`raw::poll`, `dealloc`,
/// `shutdown`, ...), from its symbol or debug-info name in either mangling
/// (`tokio::runtime::task::raw::poll::<app::f::{closure#0}, Arc<…>>`,
/// `dealloc<app::f::{async_fn_env#0}, Arc<…>>`). An `async fn`'s future is named as the
/// function.
pub(crate) fn future_type(name: &str) -> Option<String> {
    const GENERIC_OVER_T: [&str; 6] = [
        "poll",
        "dealloc",
        "try_read_output",
        "drop_join_handle_slow",
        "drop_abort_handle",
        "shutdown",
    ];
    let open = name.find('<')?;
    let function = name[..open].trim_end_matches("::").rsplit("::").next()?;
    if !GENERIC_OVER_T.contains(&function) {
        return None;
    }
    let inner = name[open + 1..].strip_suffix('>')?;
    let mut args = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '<' | '(' | '[' | '{' => depth += 1,
            '>' | ')' | ']' | '}' => depth -= 1,
            ',' if depth == 0 => {
                args.push(inner[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    args.push(inner[start..].trim());
    let [future, _scheduler] = args[..] else {
        return None;
    };
    Some(async_fn_name(future).to_owned())
}

/// An `async fn`'s future is named as the function: its state machine is
/// `f::{async_fn_env#0}` (rustc 1.9x), `f::{closure#0}` or `f::{{closure}}` (older, and
/// legacy symbols). One level only: an async block inside `f` stays `f::{closure#0}`.
fn async_fn_name(t: &str) -> &str {
    ["::{async_fn_env#0}", "::{closure#0}", "::{{closure}}"]
        .iter()
        .find_map(|s| t.strip_suffix(s))
        .unwrap_or(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spin() -> Spin {
        Spin::new(1, 0)
    }

    /// Judged over the last scans: a bad start does not outweigh a spin seen clearly since,
    /// a feeder that goes a scan without sleeping now and then never gets there, and once
    /// found the spin stays found.
    #[test]
    fn a_spin_is_judged_over_its_last_scans_and_stays_found() {
        let mut s = spin();
        for _ in 0..12 {
            s.saw(false);
        }
        assert!(!s.wakes_itself());
        for _ in 0..5 {
            s.saw(true);
            assert!(!s.wakes_itself());
        }
        s.saw(true);
        assert!(s.wakes_itself(), "6 of the last 8");
        s.saw(false);
        s.saw(false);
        s.saw(false);
        assert!(s.wakes_itself(), "stays found");
        let mut feeder = spin();
        for i in 0..40 {
            feeder.saw(i % 3 == 0);
        }
        assert!(!feeder.wakes_itself());
        let mut few = spin();
        for _ in 0..3 {
            few.saw(true);
        }
        assert!(!few.wakes_itself(), "four scans at least");
    }

    #[test]
    fn future_types_from_both_manglings() {
        assert_eq!(
            future_type(
                "tokio::runtime::task::raw::poll::<tokio_tasks::wait_for_reply::{closure#0}, \
                 alloc::sync::Arc<tokio::runtime::scheduler::multi_thread::handle::Handle>>"
            )
            .as_deref(),
            Some("tokio_tasks::wait_for_reply")
        );
        assert_eq!(
            future_type(
                "dealloc<tokio_tasks::locking_poll::{async_fn_env#0}, \
                 alloc::sync::Arc<tokio::runtime::scheduler::multi_thread::handle::Handle, \
                 alloc::alloc::Global>>"
            )
            .as_deref(),
            Some("tokio_tasks::locking_poll")
        );
        // Generic over the scheduler only.
        assert_eq!(
            future_type(
                "schedule<alloc::sync::Arc<tokio::runtime::scheduler::multi_thread::handle::Handle>>"
            ),
            None
        );
        assert_eq!(
            future_type(
                "tokio::runtime::task::raw::poll<core::pin::Pin<alloc::boxed::Box<dyn \
                 core::future::future::Future<Output = ()> + Send>>, alloc::sync::Arc<H>>"
            )
            .as_deref(),
            Some(
                "core::pin::Pin<alloc::boxed::Box<dyn core::future::future::Future<Output = ()> + Send>>"
            )
        );
        assert_eq!(
            future_type("tokio::runtime::task::waker::wake_by_val"),
            None
        );
        assert_eq!(future_type("tokio::runtime::task::raw::poll"), None);
    }

    #[test]
    fn future_types_from_cell_drops() {
        assert_eq!(
            cell_type(
                "core::ptr::drop_in_place<alloc::boxed::Box<tokio::runtime::task::core::Cell<\
                 tokio_tasks::locking_poll::{{closure}},alloc::sync::Arc<tokio::runtime::\
                 scheduler::multi_thread::handle::Handle>>>>"
            )
            .as_deref(),
            Some("tokio_tasks::locking_poll")
        );
        assert_eq!(cell_type("core::ptr::drop_in_place<u8>"), None);
    }

    #[test]
    fn searches_resume_where_they_stopped() {
        let ranges = [(0x1000, 0x3000), (0x8000, 0x9000)];
        assert_eq!(next_search_start(&ranges, 0x1000), 0x2000);
        assert_eq!(next_search_start(&ranges, 0x2800), 0x8800);
        assert_eq!(next_search_start(&ranges, 0x3000), 0);
    }
}
