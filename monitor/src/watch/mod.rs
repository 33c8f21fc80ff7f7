//! The monitoring loop: inspect processes (each runtime in its own folder, behind
//! [`crate::runtime`]), scan their tasks, judge, report to the sinks. It names no runtime.
//!
//! Everything read from a target (its memory, /proc files, executable, mapped files) is read
//! on workers with a deadline ([`crate::sys::workers`]): a process that does not answer is
//! skipped until it does, and the loop goes on with every other one. The loop itself touches
//! only the kernel maps, the detectors and the sinks, so it always sees a stop request.

mod threads;

use std::{
    collections::{HashMap, HashSet},
    io::Write,
    os::fd::OwnedFd,
    sync::Arc,
    time::{Duration, Instant},
};

use monitor_ebpf::{PROC_EVENT_EXEC, ProcEvent};
use tokio::io::{Interest, unix::AsyncFd};

use self::threads::ThreadWatch;
use crate::{
    bpf::{BpfError, Links, Probes, Stats},
    config::Settings,
    detect::{Detector, Due, Snapshot},
    output::{self, ExportError, Format, Health, Metrics, Sinks},
    proc::{self, ProcError},
    runtime::{
        Binaries, Census, Context, InspectError, Inspected, ProcessInfo, Runtime, ScanInput,
        Scanned, TaskSource, registry::RUNTIMES,
    },
    sys::{
        memory, signals,
        workers::{NotDone, Outcome, Pending, Slot, Workers},
    },
    threads::symbols::Symbolizer,
};

#[derive(Debug, thiserror::Error)]
pub(crate) enum WatchError {
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error(transparent)]
    Inspect(#[from] InspectError),
    #[error(
        "PID {pid} ({exe}) runs no runtime leakmon watches ({why}); leave --threads on to watch \
         its threads"
    )]
    Plain { pid: u32, exe: String, why: String },
    #[error("writing alerts to stdout")]
    Output(#[source] std::io::Error),
    #[error("polling the process event ring buffer")]
    Events(#[source] std::io::Error),
    #[error("setting up signal handling")]
    Signals(#[source] std::io::Error),
    #[error(
        "PID {pid} did not answer within {timeout:?} (its executable or memory blocks: a hung mount?)"
    )]
    Unresponsive { pid: u32, timeout: Duration },
    #[error(transparent)]
    Export(#[from] ExportError),
}

/// How long after its start a process that ran no runtime is looked at again at every scan.
const YOUNG: Duration = Duration::from_secs(10);
/// How often `leakmon run` looks again at processes that ran no runtime.
const RECHECK_PLAIN: Duration = Duration::from_secs(300);
/// Processes looked at again per scan, at most.
const RECHECK_PER_SCAN: usize = 64;

/// What one scan of a process brings back, with when it was taken.
type TaskScan = (u64, Scanned);

/// A process whose tasks are watched.
struct Watched {
    info: ProcessInfo,
    start_time: u64,
    /// Held here, not in the source, so detaching never waits for a worker.
    links: Option<Links>,
    /// Its tasks, counted at the last scan that saw them all.
    census: Option<Census>,
    slot: Slot<Box<dyn TaskSource>, TaskScan>,
}

impl Watched {
    /// Whether the process still runs (PIDs are reused). An exec, which keeps the PID and
    /// start time, is seen by the scan itself (on a worker: it asks the executable's file
    /// system).
    fn is_alive(&self, pid: u32) -> bool {
        proc::stat(pid).is_ok_and(|(state, start)| state != 'Z' && start == self.start_time)
    }
}

struct Monitor {
    probes: Probes,
    detector: Detector,
    targets: HashMap<u32, Watched>,
    /// Processes being inspected on a worker (`leakmon run`), taken in at the next scan.
    attaching: HashMap<u32, Pending<Result<Inspected, InspectError>>>,
    /// The programs every runtime of the registry recognised.
    binaries: Binaries,
    symbolizer: Symbolizer,
    workers: Workers,
    /// Processes found to run no runtime leakmon knows (or not supported): PID -> start time.
    skipped: HashMap<u32, u64>,
    /// Of those, the ones that run no runtime (not an error): looked at again now and then
    /// (`leakmon run`), for a runtime in a library loaded since (Python importing a Rust
    /// extension).
    plain: HashSet<u32>,
    /// Of those, the ones that started less than [`YOUNG`] ago: looked at again each scan
    /// until they are older (an exec is seen before the dynamic loader has relocated the
    /// program, when a tokio build's task vtables are not pointers yet).
    young: HashSet<u32>,
    last_recheck: Instant,
    recheck: Vec<u32>,
    /// Processes whose inspection waited too long for another: tried again at the next scan.
    retry: Vec<u32>,
    sinks: Sinks,
    settings: Settings,
    /// `leakmon run`: look for new processes (again, after lost exec events).
    discover: bool,
    last_stats: Stats,
    scans: u64,
    /// Thread-level monitoring (unless disabled).
    threads: Option<ThreadWatch>,
    /// Readable once SIGTERM or SIGINT arrived.
    stop: OwnedFd,
    /// Whether failing to write the status file was said.
    status_warned: bool,
}

/// `leakmon watch`: the given processes, until interrupted or until they have all exited.
/// Programs that run a runtime leakmon knows get task and thread detection; any other program
/// thread detection.
pub(crate) async fn watch<W: Write + 'static>(
    pids: &[u32],
    settings: Settings,
    out: W,
) -> Result<(), WatchError> {
    let defaults = output::Defaults {
        format: Format::Text,
        serve: false,
    };
    let mut m = Monitor::new(settings, defaults, out)?;
    let with_threads = m.settings.threads;
    for pid in pids {
        match m.add_now(*pid) {
            Ok(()) => {}
            Err(WatchError::Plain { pid, exe, why }) if with_threads => {
                log::info!("PID {pid} ({exe}): {why}: watching its threads only");
            }
            Err(WatchError::Inspect(InspectError::Proc(e @ ProcError::OnFuse { .. })))
                if with_threads =>
            {
                log::warn!("{e}");
            }
            Err(e) => return Err(e),
        }
    }
    if with_threads {
        m.threads = Some(ThreadWatch::start(
            &mut m.probes,
            &m.workers,
            m.symbolizer.clone(),
            m.settings.thresholds,
            m.settings.target_timeout,
            Some(pids.iter().copied().collect()),
        )?);
    }
    m.run_loop(None, true).await
}

/// `leakmon run`: the threads of every process on the host, and the tasks of every program
/// that runs a runtime leakmon knows, found now and on exec.
pub(crate) async fn run<W: Write + 'static>(settings: Settings, out: W) -> Result<(), WatchError> {
    let defaults = output::Defaults {
        format: Format::Json,
        serve: true,
    };
    let mut m = Monitor::new(settings, defaults, out)?;
    m.discover = true;
    let events = m.probes.proc_events()?;
    // SAFETY: the ring buffer owns its map fd, which stays open and unchanged while the
    // AsyncFd owns the ring buffer.
    let events = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
        .map_err(|e| WatchError::Events(e.into_parts().1))?;
    for pid in all_pids() {
        m.try_add(pid);
    }
    let deadline = Instant::now() + m.settings.target_timeout;
    m.take_attached(Some(deadline));
    if m.settings.threads {
        m.threads = Some(ThreadWatch::start(
            &mut m.probes,
            &m.workers,
            m.symbolizer.clone(),
            m.settings.thresholds,
            m.settings.target_timeout,
            None,
        )?);
    }
    // "watching 3 Go processes and 1 tokio processes, and the threads of every process"
    let counts: Vec<String> = RUNTIMES
        .iter()
        .map(|r| {
            let n = m
                .targets
                .values()
                .filter(|w| w.info.runtime == r.name)
                .count();
            format!("{n} {} processes", r.title)
        })
        .collect();
    log::info!(
        "watching {}{}",
        counts.join(" and "),
        if m.threads.is_some() {
            ", and the threads of every process"
        } else {
            ""
        }
    );
    m.run_loop(Some(events), false).await
}

type Events = AsyncFd<aya::maps::RingBuf<aya::maps::MapData>>;

impl Monitor {
    fn new<W: Write + 'static>(
        settings: Settings,
        defaults: output::Defaults,
        out: W,
    ) -> Result<Self, WatchError> {
        let stop = signals::install().map_err(WatchError::Signals)?;
        if let Err(e) = crate::sys::tracefs::ensure_mounted() {
            // Not needed for perf-based uprobes; say so and go on.
            log::warn!("{}", crate::sys::chain(&e));
        }
        if let Some(note) = crate::config::scan_note(&settings.thresholds) {
            log::warn!("{note}");
        }
        let sinks = output::start(&settings.sinks, defaults, out)?;
        // Caches get half the budget; the rest is the daemon's own tables and buffers.
        let symbolizer = Symbolizer::new(settings.memory_budget / 2);
        let context = Context {
            unvalidated: settings.go_unvalidated,
            probe_parks: settings.probe_parks,
            reach_budget: settings.reach_budget,
            symbolizer: symbolizer.clone(),
        };
        let runtimes: Arc<[Arc<dyn Runtime>]> =
            RUNTIMES.iter().map(|r| (r.start)(&context)).collect();
        Ok(Self {
            probes: Probes::load(settings.capacity)?,
            detector: Detector::new(settings.thresholds),
            targets: HashMap::new(),
            attaching: HashMap::new(),
            binaries: Binaries::new(runtimes),
            symbolizer,
            workers: Workers::default(),
            skipped: HashMap::new(),
            plain: HashSet::new(),
            young: HashSet::new(),
            last_recheck: Instant::now(),
            recheck: Vec::new(),
            retry: Vec::new(),
            discover: false,
            last_stats: Stats::default(),
            scans: 0,
            threads: None,
            sinks,
            settings,
            stop,
            status_warned: false,
        })
    }

    /// Inspects `pid` on a worker (it reads what the target controls).
    fn inspect(&self, pid: u32) -> Pending<Result<Inspected, InspectError>> {
        let binaries = self.binaries.clone();
        self.workers.run(move || binaries.inspect(pid))
    }

    /// `leakmon watch`: attaches to `pid` now, or says why not.
    fn add_now(&mut self, pid: u32) -> Result<(), WatchError> {
        let deadline = Instant::now() + self.settings.target_timeout;
        let inspected = match self.inspect(pid).wait(deadline, signals::stop_requested) {
            Ok(inspected) => inspected?,
            Err(_) => {
                return Err(WatchError::Unresponsive {
                    pid,
                    timeout: self.settings.target_timeout,
                });
            }
        };
        match inspected {
            Inspected::Source(source) => self.attach(source),
            Inspected::Plain(exe) => Err(WatchError::Plain {
                pid,
                exe: exe.display().to_string(),
                why: self.binaries.absent(),
            }),
            // One inspection at a time: nothing else is inspected while `watch` starts.
            Inspected::Busy => Err(WatchError::Unresponsive {
                pid,
                timeout: self.settings.target_timeout,
            }),
        }
    }

    /// Attaches what probes `source` needs and starts scanning it.
    fn attach(&mut self, mut source: Box<dyn TaskSource>) -> Result<(), WatchError> {
        let links = source.attach(&mut self.probes)?;
        let info = source.process().clone();
        self.targets.insert(
            info.pid,
            Watched {
                start_time: source.start_time(),
                info,
                links,
                census: None,
                slot: Slot::new(source),
            },
        );
        Ok(())
    }

    /// `leakmon run`: starts inspecting `pid` if it is not watched yet and was not found to
    /// run no runtime; anything else is remembered and skipped.
    fn try_add(&mut self, pid: u32) {
        if pid == std::process::id()
            || self.targets.contains_key(&pid)
            || self.attaching.contains_key(&pid)
        {
            return;
        }
        let Ok((_, start)) = proc::stat(pid) else {
            return;
        };
        if self.skipped.get(&pid) == Some(&start) {
            return;
        }
        // Even the executable's identity is read on a worker: stat() of /proc/PID/exe asks
        // the file's file system, which may be a hung mount.
        let pending = self.inspect(pid);
        self.attaching.insert(pid, pending);
    }

    /// Takes in the inspections that are done (waiting for them until `deadline`, if given).
    fn take_attached(&mut self, deadline: Option<Instant>) {
        let pids: Vec<u32> = self.attaching.keys().copied().collect();
        for pid in pids {
            let Some(pending) = self.attaching.get(&pid) else {
                continue;
            };
            let result = match deadline {
                Some(d) => pending.wait(d, signals::stop_requested),
                None => pending.try_take(),
            };
            let result = match result {
                Ok(r) => r,
                Err(NotDone::Late) => {
                    if deadline.is_some() {
                        log::warn!(
                            "PID {pid} did not answer within {:?} while its executable was \
                             inspected: tried again when it does",
                            self.settings.target_timeout
                        );
                    }
                    continue;
                }
                Err(NotDone::Lost) => Err(InspectError::Proc(ProcError::NoSuchProcess { pid })),
            };
            self.attaching.remove(&pid);
            let start = proc::stat(pid).map_or(0, |(_, s)| s);
            let attached = match result {
                Ok(Inspected::Source(source)) => self.attach(source),
                Ok(Inspected::Busy) => {
                    self.retry.push(pid);
                    Ok(())
                }
                Ok(Inspected::Plain(_)) => {
                    self.skipped.insert(pid, start);
                    self.plain.insert(pid);
                    if self.discover && proc::age(start).is_some_and(|a| a < YOUNG) {
                        self.young.insert(pid);
                    }
                    Ok(())
                }
                Err(e) => Err(e.into()),
            };
            match attached {
                Ok(()) => {}
                // Gone meanwhile, or a kernel thread: nothing to say.
                Err(WatchError::Inspect(InspectError::Proc(
                    ProcError::NoSuchProcess { .. } | ProcError::NoExecutable { .. },
                ))) => {
                    self.skipped.insert(pid, start);
                }
                Err(_) if !proc::is_alive(pid) => {
                    self.skipped.insert(pid, start);
                }
                Err(e) => {
                    log::warn!("not watching PID {pid}: {}", crate::sys::chain(&e));
                    self.skipped.insert(pid, start);
                }
            }
        }
    }

    async fn run_loop(
        &mut self,
        mut events: Option<Events>,
        exit_when_empty: bool,
    ) -> Result<(), WatchError> {
        let stop_fd = self.stop.try_clone().map_err(WatchError::Signals)?;
        // SAFETY: the AsyncFd owns the descriptor, which stays open while it is registered.
        let stop = unsafe { AsyncFd::register_with_interest(stop_fd, Interest::READABLE) }
            .map_err(|e| WatchError::Signals(e.into_parts().1))?;
        let mut tick = tokio::time::interval(self.settings.thresholds.scan_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !signals::stop_requested() {
            tokio::select! {
                _ = tick.tick() => {
                    // Checked before the scan: a process that died before it has had its
                    // alerts resolved by it.
                    let threads_alive = self.threads.as_ref().is_some_and(ThreadWatch::any_alive);
                    self.scan()?;
                    if exit_when_empty && self.targets.is_empty() && !threads_alive {
                        log::info!("every watched process has exited");
                        break;
                    }
                }
                ready = async { events.as_mut()?.readable_mut().await.ok() }, if events.is_some() => {
                    if let Some(mut guard) = ready {
                        let mut pids = Vec::new();
                        while let Some(item) = guard.get_inner_mut().next() {
                            if let Some(ev) = parse_event(&item) && ev.kind == PROC_EVENT_EXEC {
                                pids.push(ev.tgid);
                            }
                        }
                        guard.clear_ready();
                        for pid in pids {
                            // Re-judged: an exec replaces the program under the same PID.
                            self.drop_target(pid);
                            self.attaching.remove(&pid);
                            self.skipped.remove(&pid);
                            self.try_add(pid);
                        }
                    }
                }
                _ = stop.readable() => break,
            }
        }
        // Whatever happens from here, the process ends within the limit.
        signals::arm_shutdown_limit();
        let pids: Vec<u32> = self.targets.keys().copied().collect();
        for pid in pids {
            if let Some(mut w) = self.targets.remove(&pid)
                && let Some(links) = w.links.take()
            {
                self.probes.detach(links);
            }
        }
        let stats = self.probes.stats();
        log::info!("detached; probe totals: {stats:?}");
        self.sinks.close();
        Ok(())
    }

    fn drop_target(&mut self, pid: u32) {
        if let Some(mut w) = self.targets.remove(&pid) {
            if let Some(links) = w.links.take() {
                self.probes.detach(links);
            }
            let info = w.info.clone();
            drop(w);
            self.binaries.evict_unused();
            for t in self.detector.forget(pid) {
                let _ = self.sinks.alert(&info, &t);
            }
        }
    }

    /// Warns when the kernel side had to drop something, and recovers what can be: lost exec
    /// events mean Go processes may have started unseen, so /proc is searched again.
    fn check_stats(&mut self) {
        let now = self.probes.stats();
        let last = std::mem::replace(&mut self.last_stats, now);
        if now.map_full > last.map_full {
            log::warn!(
                "{} task records did not fit in the kernel map (capacity: --max-goroutines)",
                now.map_full - last.map_full
            );
        }
        if now.read_errors > last.read_errors {
            log::warn!(
                "{} task reads failed in the probes",
                now.read_errors - last.read_errors
            );
        }
        if now.quota_full > last.quota_full {
            log::warn!(
                "{} task records refused: a process had its share of the kernel map \
                 (--max-goroutines-per-process)",
                now.quota_full - last.quota_full
            );
        }
        if now.thread_waits_full > last.thread_waits_full || now.threads_full > last.threads_full {
            log::warn!(
                "{} futex waits and {} threads did not fit in the kernel maps; thread alerts may \
                 miss them",
                now.thread_waits_full - last.thread_waits_full,
                now.threads_full - last.threads_full
            );
        }
        if now.proc_events_lost > last.proc_events_lost {
            log::warn!(
                "{} exec events lost (ring buffer full); searching /proc for new processes",
                now.proc_events_lost - last.proc_events_lost
            );
            if self.discover {
                for pid in all_pids() {
                    self.try_add(pid);
                }
            }
        }
    }

    /// One pass over every watched process: work on targets goes to the workers, all of it
    /// at once, and what comes back by the deadline is judged.
    fn scan(&mut self) -> Result<(), WatchError> {
        let started = Instant::now();
        let now = proc::monotonic_ns();
        let t = self.settings.thresholds;
        self.scans += 1;
        self.check_stats();
        self.take_attached(None);
        for pid in std::mem::take(&mut self.retry) {
            self.try_add(pid);
        }
        let mut by_pid = self.probes.task_records();
        let gone: Vec<u32> = self
            .targets
            .iter()
            .filter(|(pid, w)| !w.is_alive(**pid))
            .map(|(pid, _)| *pid)
            .collect();
        for pid in gone {
            log::info!("PID {pid} exited (or exec'd another program)");
            self.drop_target(pid);
        }
        // Scans that came back after their deadline: judged now, with the time they were
        // taken at.
        let mut done: Vec<(u32, TaskScan)> = Vec::new();
        for (pid, w) in &mut self.targets {
            // A target away with a worker keeps its records for when it is back.
            let entries = by_pid.remove(pid).unwrap_or_default();
            if let Some(late) = w.slot.reclaim() {
                log::info!("PID {pid}'s scan finished late: judged now");
                done.push((*pid, late));
            }
            let input = ScanInput {
                due: Due {
                    now_ns: now,
                    thresholds: t,
                },
                records: entries,
            };
            w.slot
                .dispatch(&self.workers, move |source| (now, source.scan(input)));
        }
        if let Some(threads) = &mut self.threads {
            threads.dispatch(&self.probes, &self.workers, now);
        }
        let deadline = Instant::now() + self.settings.target_timeout;
        let mut judged = 0;
        let mut lost = Vec::new();
        for (pid, w) in &mut self.targets {
            match w.slot.settle(deadline, signals::stop_requested) {
                Outcome::Done(scan) => done.push((*pid, scan)),
                Outcome::Late { first } => {
                    if first {
                        log::warn!(
                            "PID {pid} did not answer within {:?} (a very large process, or \
                             its memory blocks: a hung mount?): its tasks are judged when its \
                             scan is done; every other process is still watched",
                            self.settings.target_timeout
                        );
                    }
                }
                Outcome::Lost => lost.push(*pid),
                Outcome::Idle => {}
            }
        }
        for (pid, (taken_ns, scan)) in done {
            let (tasks, stale, policy, census, marking) = match scan {
                Scanned::Tasks {
                    tasks,
                    stale,
                    policy,
                    census,
                    marking,
                } => (tasks, stale, policy, census, marking),
                Scanned::NotJudged => continue,
                Scanned::OtherProgram => {
                    lost.push(pid);
                    continue;
                }
            };
            let Some(w) = self.targets.get_mut(&pid) else {
                continue;
            };
            if census.is_some() {
                w.census = census;
            }
            for (id, record) in stale {
                self.probes.forget_record(pid, id, &record);
            }
            judged += tasks.len();
            let snapshot = Snapshot {
                now_ns: taken_ns,
                tasks,
                policy,
                marking,
            };
            for transition in self.detector.observe(pid, &snapshot) {
                self.sinks
                    .alert(&w.info, &transition)
                    .map_err(WatchError::Output)?;
            }
        }
        // Exec'd another program, or the worker failed (a bug): judged afresh.
        for pid in lost {
            log::info!(
                "PID {pid} runs another program now (or its scan failed): inspecting it again"
            );
            self.drop_target(pid);
            self.skipped.remove(&pid);
            self.try_add(pid);
        }
        if let Some(threads) = &mut self.threads {
            let targets = &self.targets;
            let task_info = |pid| targets.get(&pid).map(|w: &Watched| w.info.clone());
            for (info, transition) in threads.collect(&mut self.probes, deadline, task_info) {
                self.sinks
                    .alert(&info, &transition)
                    .map_err(WatchError::Output)?;
            }
        }
        // Records of processes no longer watched (exited, or exec'd), in one walk.
        let leftovers: HashSet<u32> = by_pid
            .into_keys()
            .filter(|pid| !self.attaching.contains_key(pid))
            .collect();
        self.probes.forget_processes(&leftovers);
        // Forget skipped processes that have gone (PIDs are reused), now and then.
        if self.scans.is_multiple_of(64) {
            self.skipped
                .retain(|pid, start| proc::stat(*pid).is_ok_and(|(_, s)| s == *start));
            let skipped = &self.skipped;
            self.plain.retain(|pid| skipped.contains_key(pid));
        }
        // Programs that ran no runtime may have loaded a library with one since: looked at
        // again (their executables are known to run none, and libraries already read are
        // remembered, so this reads /proc/PID/maps and little else).
        if self.discover && self.last_recheck.elapsed() >= RECHECK_PLAIN {
            self.last_recheck = Instant::now();
            self.recheck.extend(self.plain.drain());
        }
        // Processes just started that looked plain: once more each scan while young.
        for pid in std::mem::take(&mut self.young) {
            if self.skipped.remove(&pid).is_some() {
                self.plain.remove(&pid);
                self.try_add(pid);
            }
        }
        // A slice per scan, so a host of thousands does not queue them all at once.
        let n = self.recheck.len().min(RECHECK_PER_SCAN);
        for pid in self.recheck.drain(..n).collect::<Vec<_>>() {
            if self.skipped.remove(&pid).is_some() {
                self.try_add(pid);
            }
        }
        self.binaries.evict_unused();
        self.symbolizer.tick();
        // What was freed this scan (evicted modules, processes gone, read buffers) goes back
        // to the system; without this the footprint only ever grows. About 1 ms.
        memory::release_free();
        log::debug!(
            "scan: {} processes, {judged} tasks judged in {:?}; {:?}; caches {:?}; {} KiB",
            self.targets.len(),
            started.elapsed(),
            self.last_stats,
            self.symbolizer.stats(),
            memory::rss_bytes() >> 10,
        );
        self.export_metrics(started.elapsed());
        if self.discover {
            self.write_status();
        }
        Ok(())
    }

    /// For `leakmon doctor`: the daemon's memory and caches, after each scan.
    fn write_status(&mut self) {
        let cache = self.symbolizer.stats();
        let status = crate::status::Status {
            pid: std::process::id(),
            rss_bytes: memory::rss_bytes(),
            anon_bytes: memory::anon_bytes(),
            budget_bytes: self.settings.memory_budget,
            cache_bytes: cache.bytes,
            cache_modules: cache.modules,
            cache_evicted: cache.evicted,
            task_processes: self.targets.len(),
            unresponsive: self.targets.values().filter(|w| w.slot.is_stuck()).count()
                + self.threads.as_ref().map_or(0, ThreadWatch::stuck),
            time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        };
        let path = std::path::Path::new(crate::status::STATUS_FILE);
        if let Err(e) = status.write(path)
            && !self.status_warned
        {
            self.status_warned = true;
            log::info!(
                "not writing {} ({e}): `leakmon doctor` will not show this daemon's memory",
                path.display()
            );
        }
    }

    /// Hands the sinks what this scan leaves for the metrics.
    fn export_metrics(&mut self, scan: Duration) {
        if !self.sinks.wants_metrics() {
            return;
        }
        let s = self.last_stats;
        let cache = self.symbolizer.stats();
        let (workers, late) = self.workers.stats();
        let stuck = self.targets.values().filter(|w| w.slot.is_stuck()).count()
            + self.threads.as_ref().map_or(0, ThreadWatch::stuck);
        let mut firing: Vec<_> = self.detector.firing().collect();
        if let Some(threads) = &self.threads {
            firing.extend(threads.firing());
        }
        let metrics = Metrics {
            firing,
            counts: self
                .targets
                .values()
                .filter_map(|w| Some((&w.info, w.census.as_ref()?)))
                // A process whose tasks are watched is named as its runtime names it.
                .chain(
                    self.threads
                        .iter()
                        .flat_map(ThreadWatch::counts)
                        .map(|(info, c)| {
                            (self.targets.get(&info.pid).map_or(info, |w| &w.info), c)
                        }),
                )
                .collect(),
            health: Health {
                probe_hits: s.parks + s.preempts + s.exits,
                events_dropped: s.map_full
                    + s.quota_full
                    + s.proc_events_lost
                    + s.thread_waits_full
                    + s.threads_full,
                last_scan_seconds: scan.as_secs_f64(),
                processes_attached: self.targets.len() as u64,
                alerts_fired: self.sinks.fired(),
                memory_bytes: memory::rss_bytes(),
                cache_bytes: cache.bytes,
                cache_evicted: cache.evicted,
                targets_unresponsive: stuck as u64,
                workers: workers as u64,
                late_results: late,
            },
        };
        self.sinks.metrics(&metrics);
    }
}

fn parse_event(bytes: &[u8]) -> Option<ProcEvent> {
    if bytes.len() < size_of::<ProcEvent>() {
        return None;
    }
    // SAFETY: ProcEvent is plain data and the length was checked; read_unaligned handles the
    // ring buffer's alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<ProcEvent>()) })
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}
