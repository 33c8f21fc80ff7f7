//! The monitoring loop: attach to Go processes, scan what the probes keep, judge, report.

mod target;
mod threads;

use std::{
    collections::{HashMap, HashSet},
    io::Write,
    time::Instant,
};

use monitor_ebpf::{PROC_EVENT_EXEC, ProcEvent};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};

pub use self::target::{Binaries, BinaryKey, Target, TargetError};
use self::threads::ThreadWatch;
use crate::{
    bpf::{BpfError, Probes, Stats},
    config::Settings,
    detect::{Detector, Snapshot},
    export::{GroupGauge, Health, MetricsSnapshot},
    go::GoError,
    output::{Format, Output, ProcessInfo},
    proc::{self, ProcError},
};

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(transparent)]
    Bpf(#[from] BpfError),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("writing alerts to stdout")]
    Output(#[source] std::io::Error),
    #[error("polling the process event ring buffer")]
    Events(#[source] std::io::Error),
    #[error("setting up signal handling")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Export(#[from] crate::export::ExportError),
}

struct Monitor<W: Write> {
    probes: Probes,
    detector: Detector,
    targets: HashMap<u32, (Target, ProcessInfo)>,
    binaries: Binaries,
    /// Processes found not to be Go (or not supported): PID -> start time.
    skipped: HashMap<u32, u64>,
    out: Output<W>,
    settings: Settings,
    /// `leakmon run`: look for new Go processes (again, after lost exec events).
    discover: bool,
    last_stats: Stats,
    scans: u64,
    /// Thread-level monitoring (unless disabled).
    threads: Option<ThreadWatch>,
}

/// `leakmon watch`: the given processes, until interrupted or until they have all exited.
/// Go programs get goroutine and thread detection; any other program thread detection.
pub async fn watch<W: Write>(pids: &[u32], settings: Settings, out: W) -> Result<(), WatchError> {
    let mut m = Monitor::new(settings, Format::Text, out)?;
    let with_threads = m.settings.threads;
    for pid in pids {
        match m.add(*pid) {
            Ok(()) => {}
            Err(TargetError::Go {
                source: GoError::NotGo,
                ..
            }) if with_threads => {
                log::info!("PID {pid} is not a Go program: watching its threads only");
            }
            Err(e) => return Err(e.into()),
        }
    }
    if with_threads {
        m.threads = Some(ThreadWatch::start(
            &mut m.probes,
            m.settings.thresholds,
            Some(pids.iter().copied().collect()),
        )?);
    }
    m.run_loop(None, true).await
}

/// `leakmon run`: the threads of every process on the host, and the goroutines of every Go
/// program, found now and on exec.
pub async fn run<W: Write>(settings: Settings, out: W) -> Result<(), WatchError> {
    let mut m = Monitor::new(settings, Format::Json, out)?;
    m.discover = true;
    let events = m.probes.proc_events()?;
    // SAFETY: the ring buffer owns its map fd, which stays open and unchanged while the
    // AsyncFd owns the ring buffer.
    let events = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
        .map_err(|e| WatchError::Events(e.into_parts().1))?;
    for pid in all_pids() {
        m.try_add(pid);
    }
    if m.settings.threads {
        m.threads = Some(ThreadWatch::start(
            &mut m.probes,
            m.settings.thresholds,
            None,
        )?);
    }
    log::info!(
        "watching {} Go processes{}",
        m.targets.len(),
        if m.threads.is_some() {
            ", and the threads of every process"
        } else {
            ""
        }
    );
    m.run_loop(Some(events), false).await
}

type Events = AsyncFd<aya::maps::RingBuf<aya::maps::MapData>>;

impl<W: Write> Monitor<W> {
    fn new(settings: Settings, default_format: Format, out: W) -> Result<Self, WatchError> {
        if let Err(e) = crate::sys::tracefs::ensure_mounted() {
            // Not needed for perf-based uprobes; say so and go on.
            log::warn!("{e}");
        }
        if let Some(note) = crate::config::scan_note(&settings.thresholds) {
            log::warn!("{note}");
        }
        let otlp = match &settings.otlp {
            Some(s) => {
                log::info!(
                    "exporting alerts to {} and metrics to {} over OTLP ({:?})",
                    s.logs_endpoint,
                    s.metrics_endpoint,
                    s.protocol
                );
                Some(crate::export::Otlp::start(s.clone())?)
            }
            None => None,
        };
        Ok(Self {
            probes: Probes::load(settings.max_goroutines)?,
            detector: Detector::new(settings.thresholds),
            targets: HashMap::new(),
            binaries: Binaries::default(),
            skipped: HashMap::new(),
            discover: false,
            last_stats: Stats::default(),
            scans: 0,
            threads: None,
            out: Output::new(settings.format.unwrap_or(default_format), out, otlp),
            settings,
        })
    }

    fn add(&mut self, pid: u32) -> Result<(), TargetError> {
        let target = Target::attach(
            pid,
            &mut self.probes,
            &mut self.binaries,
            self.settings.probe_parks,
        )?;
        let info = ProcessInfo {
            pid,
            exe: target.exe.display().to_string(),
            runtime: "go",
            runtime_version: target.binary.version.to_string(),
            container: target.container.clone(),
        };
        self.targets.insert(pid, (target, info));
        Ok(())
    }

    /// Attaches to `pid` if it is a Go program; anything else is remembered and skipped.
    fn try_add(&mut self, pid: u32) {
        if pid == std::process::id() || self.targets.contains_key(&pid) {
            return;
        }
        let Ok((_, start)) = proc::stat(pid) else {
            return;
        };
        if self.skipped.get(&pid) == Some(&start) {
            return;
        }
        match self.add(pid) {
            Ok(()) => {}
            Err(TargetError::Go {
                source: GoError::NotGo | GoError::NotElf { .. },
                ..
            })
            | Err(TargetError::Proc(ProcError::NoSuchProcess { .. })) => {
                self.skipped.insert(pid, start);
            }
            Err(e) => {
                log::warn!("not watching PID {pid}: {e}");
                self.skipped.insert(pid, start);
            }
        }
    }

    async fn run_loop(
        &mut self,
        mut events: Option<Events>,
        exit_when_empty: bool,
    ) -> Result<(), WatchError> {
        let mut sigterm = signal(SignalKind::terminate()).map_err(WatchError::Signals)?;
        let mut sigint = signal(SignalKind::interrupt()).map_err(WatchError::Signals)?;
        let mut tick = tokio::time::interval(self.settings.thresholds.scan_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
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
                            self.skipped.remove(&pid);
                            self.try_add(pid);
                        }
                    }
                }
                _ = sigterm.recv() => break,
                _ = sigint.recv() => break,
            }
        }
        let pids: Vec<u32> = self.targets.keys().copied().collect();
        for pid in pids {
            if let Some((mut t, _)) = self.targets.remove(&pid) {
                t.detach(&mut self.probes);
            }
        }
        let stats = self.probes.stats();
        log::info!("detached; probe totals: {stats:?}");
        self.out.close();
        Ok(())
    }

    fn drop_target(&mut self, pid: u32) {
        if let Some((mut target, info)) = self.targets.remove(&pid) {
            target.detach(&mut self.probes);
            drop(target);
            self.binaries.evict_unused();
            for t in self.detector.forget(pid) {
                let _ = self.out.emit(&info, &t);
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
                "{} goroutine records did not fit in the kernel map (capacity: --max-goroutines)",
                now.map_full - last.map_full
            );
        }
        if now.read_errors > last.read_errors {
            log::warn!(
                "{} goroutine reads failed in the probes",
                now.read_errors - last.read_errors
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
                "{} exec events lost (ring buffer full); searching /proc for new Go processes",
                now.proc_events_lost - last.proc_events_lost
            );
            if self.discover {
                for pid in all_pids() {
                    self.try_add(pid);
                }
            }
        }
    }

    /// One pass over every watched process.
    fn scan(&mut self) -> Result<(), WatchError> {
        let started = Instant::now();
        let now = proc::monotonic_ns();
        let t = self.settings.thresholds;
        let ns = |d: std::time::Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.scans += 1;
        self.check_stats();
        let mut by_pid = self.probes.goroutines();
        let gone: Vec<u32> = self
            .targets
            .iter()
            .filter(|(_, (target, _))| !target.is_alive())
            .map(|(pid, _)| *pid)
            .collect();
        for pid in gone {
            log::info!("PID {pid} exited (or exec'd another program)");
            self.drop_target(pid);
        }
        let mut judged = 0;
        for (pid, (target, info)) in self.targets.iter_mut() {
            let entries = by_pid.remove(pid).unwrap_or_default();
            let mut goroutines = target.scan_parked(now, ns(t.block));
            let mut stale = Vec::new();
            for (goid, state) in &entries {
                let mut is_stale = false;
                if let Some(o) =
                    target.observe(*goid, state, now, ns(t.block), ns(t.spin), &mut is_stale)
                {
                    goroutines.push(o);
                } else if is_stale {
                    stale.push((*goid, *state));
                }
            }
            target.retain_resolved(|g| entries.contains_key(&g));
            for (goid, state) in stale {
                self.probes.forget_goroutine(*pid, goid, &state);
            }
            judged += goroutines.len();
            let snapshot = Snapshot {
                now_ns: now,
                goroutines,
            };
            for transition in self.detector.observe(*pid, &snapshot) {
                self.out
                    .emit(info, &transition)
                    .map_err(WatchError::Output)?;
            }
        }
        if let Some(threads) = &mut self.threads {
            let targets = &self.targets;
            let go_info = |pid| {
                targets
                    .get(&pid)
                    .map(|(_, info): &(Target, ProcessInfo)| info.clone())
            };
            for (info, transition) in threads.scan(&mut self.probes, now, go_info) {
                self.out
                    .emit(&info, &transition)
                    .map_err(WatchError::Output)?;
            }
        }
        // Records of processes no longer watched (exited, or exec'd), in one walk.
        let leftovers: HashSet<u32> = by_pid.into_keys().collect();
        self.probes.forget_processes(&leftovers);
        // Forget skipped processes that have gone (PIDs are reused), now and then.
        if self.scans.is_multiple_of(64) {
            self.skipped
                .retain(|pid, start| proc::stat(*pid).is_ok_and(|(_, s)| s == *start));
        }
        log::debug!(
            "scan: {} processes, {judged} goroutines judged in {:?}; {:?}",
            self.targets.len(),
            started.elapsed(),
            self.last_stats
        );
        self.export_metrics(started.elapsed());
        Ok(())
    }

    /// Refreshes what the OTLP metrics report.
    fn export_metrics(&self, scan: std::time::Duration) {
        let Some(otlp) = self.out.otlp() else {
            return;
        };
        let s = self.last_stats;
        let mut groups: Vec<GroupGauge> = self
            .detector
            .firing()
            .map(|(pid, alert)| GroupGauge::of(pid, alert))
            .collect();
        if let Some(threads) = &self.threads {
            groups.extend(
                threads
                    .firing()
                    .map(|(pid, alert)| GroupGauge::of(pid, alert)),
            );
        }
        otlp.update_metrics(MetricsSnapshot {
            groups,
            health: Health {
                probe_hits: s.parks + s.preempts + s.exits,
                events_dropped: s.map_full
                    + s.proc_events_lost
                    + s.thread_waits_full
                    + s.threads_full,
                last_scan_seconds: scan.as_secs_f64(),
                processes_attached: self.targets.len() as u64,
                alerts_fired: self.out.fired(),
            },
        });
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
