//! Tasks that spin: polled again and again without ever waiting, their future the same at
//! every rest (a `yield_now` loop, a future that wakes itself and returns Pending, polling a
//! condition that never comes). tokio counts no polls without `tokio_unstable`, and a probe
//! would cost every poll of the program, so each scan samples the tasks found scheduled from
//! outside, back to back for a few milliseconds: the state word (is it being polled, is it
//! idle) at every sample, the whole future every few. A spinner is seen entering its poll
//! thousands of times a second, hardly ever idle, and its future reads the same whenever it
//! is not being polled; a busy task doing work changes its future as it goes.

use std::time::{Duration, Instant};

use super::layout::{COMPLETE, NOTIFIED, RUNNING};
use crate::proc::{ProcMem, files::read_proc_capped, u64_at};

/// How long the tasks of one scan are sampled: the daemon's CPU per scan of a process with
/// tasks scheduled.
const BURST: Duration = Duration::from_millis(10);
/// Tasks sampled per scan, at most (those already suspected first): each sample reads them
/// all, and a slower round blurs the idle stretches.
pub(crate) const MAX_TASKS: usize = 16;
/// Sampling time all processes together may spend per second: a host with many busy tokio
/// services costs at most this much CPU for it (5% of a core); a process whose turn finds it
/// spent is sampled at a later scan.
const BUDGET_PER_SEC: Duration = Duration::from_millis(50);

/// Takes one burst's time from the budget of the current second, if it has that much left.
pub(crate) fn take_budget() -> bool {
    static USED: std::sync::Mutex<Option<(Instant, Duration)>> = std::sync::Mutex::new(None);
    let mut used = USED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let now = Instant::now();
    let (since, spent) = match *used {
        Some((since, spent)) if now - since < Duration::from_secs(1) => (since, spent),
        _ => (now, Duration::ZERO),
    };
    if spent + BURST > BUDGET_PER_SEC {
        *used = Some((since, spent));
        return false;
    }
    *used = Some((since, spent + BURST));
    true
}
/// Changes of state (polled, queued, idle) a second a spinner is seen making, at least.
/// Samples see a fraction of them: a `yield_now` loop goes round hundreds of thousands of
/// times a second, and 40,000 to 120,000 changes a second were seen here; a hyper connection
/// under keep-alive load, below 10,000.
const MIN_CHANGE_RATE: f64 = 20_000.0;
/// A spinner is idle only between the end of a poll and its own wake: 2-5 µs seen here on a
/// tokio 1.54 multi-thread runtime, 10-21 µs on 1.35 and on current-thread runtimes (whose
/// workers poll the I/O driver, a system call, between tasks; idle 85% of the time). A task
/// woken by I/O or another thread waits longer, even under load: a loopback round trip is
/// 30-80 µs. The median of its idle stretches says which.
const MAX_IDLE_STRETCH: Duration = Duration::from_micros(25);
/// Share of the future's reads at rest that must agree. A task going back and forth between
/// two awaits (a ping-pong) rests at two states about evenly; a spinner rests at one, but an
/// optimised (LTO) build's yield loop was seen resting at two or three that differ in the
/// state machine's own bytes, the most common 60-80% of reads.
const MIN_SAME_SHARE: f64 = 0.6;
/// Reads at rest needed to judge the future.
const MIN_RESTS: usize = 8;
/// Future bytes read to tell progress, at most.
const FUTURE_BYTES: usize = 1024;
/// The whole future is read at every this many samples.
const FULL_EVERY: u32 = 8;
/// Idle stretches kept per task for the median.
const MAX_STRETCHES: usize = 4096;

/// Threads of a process whose CPU time and voluntary switches are compared from scan to
/// scan, at most.
const MAX_THREADS: usize = 1024;
/// A thread that ran this share of the time since the last scan ...
const BUSY_SHARE: f64 = 0.5;
/// ... with at most this many voluntary switches a second never sleeps: a worker with a
/// yielding task in its queue never parks (measured here: none in a second), while one fed by
/// another thread parks thousands of times a second, however busy.
const MAX_SLEEPS_PER_SEC: f64 = 20.0;

/// CPU time and voluntary context switches of each thread of a process, at the last look.
#[derive(Default)]
pub(crate) struct ThreadClock {
    at: Option<Instant>,
    threads: std::collections::HashMap<u32, (u64, u64)>,
}

impl ThreadClock {
    /// The threads of `pid` that ran at least half the time since the last call, when they
    /// all did so without going to sleep (workers kept busy by a task that yields or wakes
    /// itself); empty otherwise.
    pub(crate) fn sleepless(&mut self, pid: u32) -> Vec<u32> {
        let now = Instant::now();
        let mut threads = std::collections::HashMap::new();
        if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for tid in dir
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .take(MAX_THREADS)
            {
                if let Some(c) = thread_clock(pid, tid) {
                    threads.insert(tid, c);
                }
            }
        }
        let secs = self.at.map(|at| (now - at).as_secs_f64());
        // Every thread busy at least half the time never slept, and there is one: a feeder
        // thread spinning beside a consumer whose worker parks is not it.
        let mut busy: Vec<(u32, bool)> = match secs {
            Some(secs) if secs > 0.0 => threads
                .iter()
                .filter_map(|(tid, (run, sleeps))| {
                    let (run0, sleeps0) = self.threads.get(tid)?;
                    let ran = run.saturating_sub(*run0) as f64 / 1e9 / secs;
                    let slept = sleeps.saturating_sub(*sleeps0) as f64 / secs;
                    (ran >= BUSY_SHARE).then_some((*tid, slept <= MAX_SLEEPS_PER_SEC))
                })
                .collect(),
            _ => Vec::new(),
        };
        self.at = Some(now);
        self.threads = threads;
        if !busy.iter().all(|(_, never_slept)| *never_slept) {
            return Vec::new();
        }
        busy.sort_unstable();
        busy.into_iter().map(|(tid, _)| tid).collect()
    }
}

/// A thread's CPU time (ns, from schedstat) and voluntary context switches (from status).
fn thread_clock(pid: u32, tid: u32) -> Option<(u64, u64)> {
    let base = format!("/proc/{pid}/task/{tid}");
    let sched = read_proc_capped(&format!("{base}/schedstat"), 256).ok()?;
    let run = std::str::from_utf8(&sched)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let status = read_proc_capped(&format!("{base}/status"), 8192).ok()?;
    let sleeps = std::str::from_utf8(&status)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))?
        .trim()
        .parse()
        .ok()?;
    Some((run, sleeps))
}

/// A task to sample: its header's address and where its future lies in it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Task {
    pub addr: u64,
    pub future_at: u64,
    pub future_len: usize,
}

/// What the samples of one task said.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Sampled {
    /// State changes seen, per second (a lower bound).
    pub change_rate: f64,
    pub idle_share: f64,
    /// Median of the idle stretches seen (zero when never idle).
    pub idle_stretch: Duration,
    /// The future's bytes at rest (hashed), when most reads at rest agree.
    pub rest: Option<u64>,
    /// Reads of the future at rest (not in a poll).
    pub rests: usize,
    /// The states most often read at rest, with how many reads each (most first; a count of
    /// 0 is none).
    pub common: [(u64, usize); COMMON],
}

/// States at rest kept per sample: as many as one spin may go through.
pub(crate) const COMMON: usize = 4;

/// What one scan's samples say of a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Polled over and over, idle only for moments, its future the same at rest.
    Spins(u64),
    /// Its future changes: not spinning.
    Progress,
    /// Not seen spinning: it waits, or its worker was off the CPU for much of the burst (on
    /// a busy machine a spinner's thread is preempted while the task sits idle, which reads
    /// like a wait), or its idle stretches are too long for a spin.
    Unknown,
}

impl Sampled {
    /// For a task already seen spinning through the states `known`: whether it still spins,
    /// resting mostly at a few states (each a tenth of the reads or more), one of them known
    /// (an LTO build's yield loop rests at two or three, none of them always most of the
    /// reads). Those states, the known ones first.
    pub(crate) fn spins_among(&self, known: &[u64]) -> Option<Vec<u64>> {
        let mut states: Vec<(u64, usize)> = self
            .common
            .iter()
            .filter(|(_, n)| *n > 0 && n * 10 >= self.rests)
            .copied()
            .collect();
        let covered: usize = states.iter().map(|(_, n)| n).sum();
        let agree = self.rests >= MIN_RESTS
            && covered as f64 >= MIN_SAME_SHARE * self.rests as f64
            && states.iter().any(|(state, _)| known.contains(state))
            && self.change_rate >= MIN_CHANGE_RATE
            && self.idle_stretch <= MAX_IDLE_STRETCH;
        states.sort_by_key(|(state, _)| !known.contains(state));
        agree.then(|| states.into_iter().map(|(state, _)| state).collect())
    }

    pub(crate) fn verdict(&self) -> Verdict {
        let Some(rest) = self.rest else {
            // Too few reads at rest to say (its worker off the CPU in mid-poll), or reads that
            // disagree: the future changes.
            return if self.rests < MIN_RESTS {
                Verdict::Unknown
            } else {
                Verdict::Progress
            };
        };
        if self.change_rate >= MIN_CHANGE_RATE && self.idle_stretch <= MAX_IDLE_STRETCH {
            Verdict::Spins(rest)
        } else {
            Verdict::Unknown
        }
    }
}

#[derive(Default)]
struct Tally {
    samples: u32,
    idle: u32,
    changes: u32,
    last: Option<u64>,
    idle_since: Option<Instant>,
    stretches: Vec<Duration>,
    rests: Vec<u64>,
}

impl Tally {
    fn count(&mut self, state: u64, at: Instant) {
        self.samples += 1;
        let flags = state & (RUNNING | NOTIFIED | COMPLETE);
        if self.last.is_some_and(|l| l != flags) {
            self.changes += 1;
        }
        self.last = Some(flags);
        match (flags == 0, self.idle_since) {
            (true, None) => {
                self.idle += 1;
                self.idle_since = Some(at);
            }
            (true, Some(_)) => self.idle += 1,
            (false, Some(since)) => {
                self.idle_since = None;
                if self.stretches.len() < MAX_STRETCHES {
                    self.stretches.push(at - since);
                }
            }
            (false, None) => {}
        }
    }

    fn finish(mut self, secs: f64, end: Instant) -> Sampled {
        if let Some(since) = self.idle_since {
            self.stretches.push(end - since);
        }
        self.stretches.sort_unstable();
        Sampled {
            change_rate: f64::from(self.changes) / secs,
            idle_share: f64::from(self.idle) / f64::from(self.samples.max(1)),
            idle_stretch: self
                .stretches
                .get(self.stretches.len() / 2)
                .copied()
                .unwrap_or_default(),
            rest: most_common(&self.rests),
            rests: self.rests.len(),
            common: common(&self.rests),
        }
    }
}

/// Samples `tasks` for `BURST`. A task whose memory cannot be read has no rest.
pub(crate) fn sample(mem: &ProcMem, tasks: &[Task]) -> Vec<Sampled> {
    let tasks = &tasks[..tasks.len().min(MAX_TASKS)];
    if tasks.is_empty() {
        return Vec::new();
    }
    let states: Vec<(u64, usize)> = tasks.iter().map(|t| (t.addr, 8)).collect();
    // The state word, the future, and the state word again: a future read while a poll began
    // (the worker writing it) is not a read at rest.
    let full: Vec<(u64, usize)> = tasks
        .iter()
        .flat_map(|t| {
            [
                (t.addr, 8),
                (t.future_at, t.future_len.clamp(1, FUTURE_BYTES)),
                (t.addr, 8),
            ]
        })
        .collect();
    let full_len: usize = full.iter().map(|r| r.1).sum();
    let mut state_buf = vec![0u8; states.len() * 8];
    let mut full_buf = vec![0u8; full_len];
    let mut tallies: Vec<Tally> = tasks.iter().map(|_| Tally::default()).collect();
    let started = Instant::now();
    let mut n = 0u32;
    loop {
        let now = Instant::now();
        if now - started >= BURST {
            break;
        }
        n = n.wrapping_add(1);
        if n.is_multiple_of(FULL_EVERY) {
            let ok = mem.read_ranges(&full, &mut full_buf);
            let mut at = 0;
            for (k, tally) in tallies.iter_mut().enumerate() {
                let len = full[3 * k + 1].1;
                let future = &full_buf[at + 8..at + 8 + len];
                let before = u64_at(&full_buf[at..at + 8], 0).unwrap_or(RUNNING);
                let after = u64_at(&full_buf[at + 8 + len..at + 16 + len], 0).unwrap_or(RUNNING);
                at += 16 + len;
                if ok[3 * k] && ok[3 * k + 1] && ok[3 * k + 2] {
                    if before & RUNNING == 0 && after == before {
                        tally.rests.push(super::walk::fnv(future));
                    }
                    tally.count(before, now);
                }
            }
        } else {
            let ok = mem.read_ranges(&states, &mut state_buf);
            for (k, tally) in tallies.iter_mut().enumerate() {
                if ok[k]
                    && let Some(state) = u64_at(&state_buf, k * 8)
                {
                    tally.count(state, now);
                }
            }
        }
    }
    let end = Instant::now();
    let secs = (end - started).as_secs_f64().max(1e-6);
    tallies.into_iter().map(|t| t.finish(secs, end)).collect()
}

/// The hash most reads at rest agree on, when enough were taken and `MIN_SAME_SHARE` of them
/// agree.
/// The `COMMON` states read most often, with their counts, most first.
fn common(rests: &[u64]) -> [(u64, usize); COMMON] {
    let mut sorted = rests.to_vec();
    sorted.sort_unstable();
    let mut runs: Vec<(u64, usize)> = sorted
        .chunk_by(|a, b| a == b)
        .filter_map(|run| Some((*run.first()?, run.len())))
        .collect();
    runs.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut out = [(0, 0); COMMON];
    for (slot, run) in out.iter_mut().zip(runs) {
        *slot = run;
    }
    out
}

fn most_common(rests: &[u64]) -> Option<u64> {
    if rests.len() < MIN_RESTS {
        return None;
    }
    let mut sorted = rests.to_vec();
    sorted.sort_unstable();
    let (mut best, mut best_n) = (sorted[0], 0usize);
    for run in sorted.chunk_by(|a, b| a == b) {
        if run.len() > best_n {
            (best, best_n) = (run[0], run.len());
        }
    }
    (best_n as f64 >= MIN_SAME_SHARE * rests.len() as f64).then_some(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rest_is_what_most_reads_agree_on() {
        let mut rests = vec![7u64; 12];
        rests.extend([1, 2, 3]);
        assert_eq!(most_common(&rests), Some(7));
        // A future that changes as the task works has no rest, nor one between two awaits.
        assert_eq!(most_common(&(0..20).collect::<Vec<_>>()), None);
        assert_eq!(most_common(&[1, 2].repeat(10)), None);
        // Too few reads to say.
        assert_eq!(most_common(&[7, 7, 7]), None);
    }

    #[test]
    fn sampling_time_is_budgeted_per_second() {
        // Five bursts fit in a second's budget (the only test taking from it), the sixth
        // waits for the next second.
        let granted = (0..6).filter(|_| take_budget()).count();
        assert_eq!(granted, 5);
    }

    #[test]
    fn changes_and_idle_stretches_are_counted() {
        let t0 = Instant::now();
        let mut t = Tally::default();
        let us = |n| t0 + Duration::from_micros(n);
        for (i, s) in [
            RUNNING,
            RUNNING,
            NOTIFIED,
            RUNNING,
            0,
            0,
            RUNNING | NOTIFIED,
            NOTIFIED,
        ]
        .into_iter()
        .enumerate()
        {
            t.count(s, us(i as u64));
        }
        assert_eq!((t.samples, t.changes, t.idle), (8, 5, 2));
        let s = t.finish(1.0, us(8));
        assert_eq!(s.idle_stretch, Duration::from_micros(2));
        let spinner = Sampled {
            change_rate: 50_000.0,
            idle_share: 0.3,
            idle_stretch: Duration::from_micros(1),
            rest: Some(1),
            rests: 100,
            common: [(1, 100), (0, 0), (0, 0), (0, 0)],
        };
        assert_eq!(spinner.verdict(), Verdict::Spins(1));
        // A future that changes, a task that waits, or too little seen.
        assert_eq!(
            Sampled {
                rest: None,
                ..spinner
            }
            .verdict(),
            Verdict::Progress
        );
        let slow_peer = Sampled {
            idle_stretch: Duration::from_micros(40),
            ..spinner
        };
        assert_eq!(slow_peer.verdict(), Verdict::Unknown);
        let unseen = Sampled {
            change_rate: 10.0,
            ..spinner
        };
        assert_eq!(unseen.verdict(), Verdict::Unknown);
    }

    #[test]
    fn a_known_spin_goes_on_through_its_rests_when_none_is_most_of_them() {
        // An LTO yield loop: two states at rest, 50/50 this time, both seen before.
        let mut reads = vec![7u64; 50];
        reads.extend([9u64; 45]);
        reads.extend([1, 2, 3, 4, 5]);
        let s = Sampled {
            change_rate: 50_000.0,
            idle_share: 0.3,
            idle_stretch: Duration::from_micros(1),
            rest: most_common(&reads),
            rests: reads.len(),
            common: common(&reads),
        };
        assert_eq!(
            s.verdict(),
            Verdict::Progress,
            "no one state is most of the reads"
        );
        assert_eq!(s.spins_among(&[9]), Some(vec![9, 7]));
        // Not a spin that rested elsewhere, nor a future that changes.
        assert_eq!(s.spins_among(&[5]), None);
        let changing: Vec<u64> = (0..100).collect();
        let c = Sampled {
            rest: None,
            common: common(&changing),
            ..s
        };
        assert_eq!(c.spins_among(&[0, 1, 2, 3]), None);
        // Nor when the task waits between polls.
        let waits = Sampled {
            idle_stretch: Duration::from_micros(40),
            ..s
        };
        assert_eq!(waits.spins_among(&[9, 7]), None);
    }
}
